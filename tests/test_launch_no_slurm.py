"""The launchers on a machine without SLURM (a laptop, a fresh CI machine): the SLURM client is hidden from PATH
whether or not it is installed here, and `make test` runs this group before anything starts the dev cluster.

Shown here: the golden Leonardo 16-node dry run, the refusals (one line each, nothing written or submitted),
and the costs, all without sbatch, sinfo or scontrol.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from _launch_fixtures import write_bench, write_manifest
from phileo.launch import finetune as ft_launch
from phileo.launch import pretrain as pt_launch
from phileo.launch import preprocess as pp_launch

pytestmark = [pytest.mark.no_slurm, pytest.mark.usefixtures("no_slurm_path")]

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"
SWEEP = REPO / "slurm" / "sweeps" / "phileo_bench.yaml"


def _launch(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A launcher as a user runs it (python jobs/<script> ...), with this test's PATH (no SLURM)."""
    return subprocess.run([sys.executable, str(REPO / "jobs" / script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def _sections(text: str) -> dict[str, str]:
    out, name = {}, None
    for line in text.splitlines(keepends=True):
        if line.startswith("# ---- "):
            name = line[7:].split(" ")[0].strip()
            out[name] = ""
        elif name is not None:
            out[name] += line
    return out


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(("preflight ERROR:", "error:"))]


@pytest.fixture
def shards(tmp_path):
    return write_manifest(tmp_path / "shards", 64)


def test_golden_leonardo_16_node_dry_run_from_a_laptop(tmp_path, shards):
    run = tmp_path / "runs" / "pretrain-16n"
    res = _launch("launch_pretrain.py", "--site", "leonardo", "--account", "AIFAC_P01", "--nodes", "16",
                  "--model", "phileo_cnn_44m", "--data", str(shards), "--steps", "200000", "--batch-size", "16",
                  "--run-dir", str(run), "--dry-run")
    assert res.returncode == 0, res.stdout + res.stderr
    parts = _sections(res.stdout)
    expected = (GOLDEN / "leonardo_pretrain_16n.sbatch").read_text()
    expected = expected.replace("@LOGS@", str(run / "logs")).replace("@PYTHON@", sys.executable)
    assert parts["batch"].strip() == expected.strip()  # --cluster auto: still the SLURM script, not local
    report = parts["preflight"]
    assert "live checks (partition, account, --after jobs): skipped (no SLURM client here)" in report
    assert "64 chunks for 16 node(s)" in report and "384 node-hours (1536 GPU-hours)" in report
    assert "all checks that can run here passed (1 not run here: see above)" in report
    assert not run.exists(), "a dry run writes nothing"


def test_auto_never_turns_a_cluster_job_into_local_processes(tmp_path, shards, capsys):
    run = tmp_path / "run"
    common = ["--data", str(shards), "--run-dir", str(run)]
    # A Leonardo job without sbatch here: refused, not run as local processes.
    code = pt_launch.main(["--site", "leonardo", "--account", "p", "--nodes", "16", *common])
    err = capsys.readouterr().err
    assert code == 2 and "`sbatch` is not on PATH here" in err and "--dry-run" in err
    # The dev profile: a multi-node job stays a SLURM job (refused here), a one-node job may run locally.
    assert pt_launch.main(["--site", "local", "--nodes", "2", *common]) == 2
    assert "sbatch` is not on PATH" in capsys.readouterr().err
    assert pt_launch.main(["--site", "local", "--nodes", "1", "--model", "phileo_cnn_tiny", *common,
                           "--dry-run"]) == 0
    assert "--cluster local: 1 local process(es)" in capsys.readouterr().out
    assert not run.exists()


def _refusal_cases(tmp_path: Path, shards: Path) -> dict[str, tuple[list[str], str]]:
    bench = write_bench(tmp_path / "bench")
    leo = ["--site", "leonardo", "--account", "p", "--dry-run"]
    return {
        "unknown model": (["pretrain", *leo, "--model", "phileo_cnn_4m", "--data", str(shards)],
                          "--model phileo_cnn_4m: unknown model 'phileo_cnn_4m'; registered models: "),
        "walltime out of range": (["pretrain", *leo, "--time", "99:99:99", "--data", str(shards)],
                                  "--time '99:99:99': minutes 99 is not below 60"),
        "finetune data and init missing": (["finetune", *leo, "--data", "/nonexistent", "--init",
                                            "/nonexistent.pt"], "--init /nonexistent.pt: no such file or folder"),
        "finetune unknown task": (["finetune", *leo, "--data", str(bench), "--task", "roadz"],
                                  "must be one of 'roads', 'building', 'lc'"),
        "sbatch option the launcher owns": (["pretrain", *leo, "--sbatch", "time=10", "--data", str(shards)],
                                            "the launcher writes --time itself; set it with --time"),
        "sweep variables unset": (["sweep", str(SWEEP), *leo, "--out", str(tmp_path / "sweep")],
                                  "uses ${PHILEO_BENCH_DATA}, ${PHILEO_WEIGHTS} (in data.root, model.init), not "
                                  "set in this shell: export PHILEO_BENCH_DATA=... PHILEO_WEIGHTS=..."),
    }


MAINS = {"pretrain": pt_launch.main, "finetune": ft_launch.finetune_main, "sweep": ft_launch.sweep_main,
         "preprocess": pp_launch.main}


@pytest.mark.parametrize("case", ["unknown model", "walltime out of range", "finetune data and init missing",
                                  "finetune unknown task", "sbatch option the launcher owns",
                                  "sweep variables unset"])
def test_each_refusal_is_one_line_that_says_what_to_change(tmp_path, shards, capsys, monkeypatch, case):
    monkeypatch.delenv("PHILEO_BENCH_DATA", raising=False)
    monkeypatch.delenv("PHILEO_WEIGHTS", raising=False)
    monkeypatch.setenv("CINECA_SCRATCH", str(tmp_path / "scratch"))  # the profile's run_root
    monkeypatch.chdir(tmp_path)
    (launcher, *argv), expected = _refusal_cases(tmp_path, shards)[case]
    before = set(tmp_path.rglob("*"))
    code = MAINS[launcher](argv)
    captured = capsys.readouterr()
    errors = _errors(captured.out + captured.err)
    assert code == 2, captured.out + captured.err
    assert any(expected in e for e in errors), errors
    if case == "finetune data and init missing":
        assert any(e.startswith("preflight ERROR: --data /nonexistent:") for e in errors), errors
    assert set(tmp_path.rglob("*")) == before, "a refused launch must write nothing"


def test_chunks_deleted_or_truncated_are_refused_and_nothing_is_started(tmp_path, shards, capsys):
    (shards / "chunks" / "chunk_00017.h5").unlink()
    (shards / "chunks" / "chunk_00040.h5").write_bytes(b"\0" * 100)
    run = tmp_path / "run"
    # A real submission to local processes: refused before any process or submitit folder exists.
    code = pt_launch.main(["--site", "local", "--cluster", "local", "--model", "phileo_cnn_tiny", "--data",
                           str(shards), "--run-dir", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and "nothing was submitted" in err
    (missing,) = [e for e in _errors(err) if "missing" in e]
    assert "1 of 64 chunk file(s) listed in manifest.json are missing (chunks/chunk_00017.h5)" in missing
    (changed,) = [e for e in _errors(err) if "differ in size" in e]
    assert "chunks/chunk_00040.h5: 100 bytes, manifest says 256" in changed
    assert not run.exists()


def test_costs_for_arrays_and_sub_node_jobs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CINECA_SCRATCH", str(tmp_path / "scratch"))
    src = tmp_path / "MajorTOM"
    src.mkdir()
    res = _launch("launch_preprocess.py", "--site", "leonardo", "--account", "p", "--source", str(src), "--out",
                  str(tmp_path / "shards"), "--tasks", "64", "--time", "08:00:00", "--dry-run")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "the array asks for 64 task(s) x 1 node(s) x 08:00:00 = 512 node-hours at most" in res.stdout
    assert "#SBATCH --partition=dcgp_usr_prod" in res.stdout and "#SBATCH --cpus-per-task=112" in res.stdout
    assert "--workers 74" in res.stdout and "#SBATCH --gres" not in res.stdout  # 2/3 of 112 cores, no GPU
    # One GPU of four: a quarter of a node, as Leonardo bills it.
    bench = write_bench(tmp_path / "bench")
    code = ft_launch.finetune_main(["--site", "leonardo", "--account", "p", "--data", str(bench), "--run-dir",
                                    str(tmp_path / "ft"), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert ("asks for 1 node(s) x 1-00:00:00 billed as 1/4 of a node (1 of 4 GPUs) = 6 node-hours "
            "(24 GPU-hours) at most") in out
    # A sweep: every task, with the variables set at submission.
    weights = tmp_path / "weights"
    weights.mkdir()
    for name in ("phileo_cnn_44m", "phileo_cnn_200m", "phileo_vit_100m"):
        (weights / f"{name}.pt").write_bytes(b"w")
    monkeypatch.setenv("PHILEO_BENCH_DATA", str(bench))
    monkeypatch.setenv("PHILEO_WEIGHTS", str(weights))
    code = ft_launch.sweep_main([str(SWEEP), "--site", "leonardo", "--account", "p", "--time", "04:00:00",
                                 "--out", str(tmp_path / "sweep"), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "the sweep asks for 360 task(s) x 1 node(s) x 04:00:00 billed as 1/4 of a node (1 of 4 GPUs) = " \
           "360 node-hours (1440 GPU-hours) at most" in out
    # A weight file gone: the sweep is refused, naming it.
    (weights / "phileo_cnn_200m.pt").unlink()
    assert ft_launch.sweep_main([str(SWEEP), "--site", "leonardo", "--account", "p", "--out",
                                 str(tmp_path / "sweep"), "--dry-run"]) == 2
    assert "model.init " + str(weights / "phileo_cnn_200m.pt") + ": no such file" in capsys.readouterr().out


def test_sbatch_options_and_after_chain_jobs(tmp_path, shards, capsys):
    later = tmp_path / "not-yet"  # the merge job of a preprocessing run will write it
    code = pt_launch.main(["--site", "leonardo", "--account", "p", "--data", str(later), "--run-dir",
                           str(tmp_path / "r"), "--after", "4242", "--sbatch", "mail-type=END,FAIL",
                           "--sbatch=--mail-user=jdoe@example.org", "--sbatch", "exclusive",
                           "--sbatch", "reservation=big run $(touch x)", "--sbatch", "constraint=a100",
                           "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0, out
    directives = [line for line in out.splitlines() if line.startswith("#SBATCH")]
    for line in ("#SBATCH --mail-type=END,FAIL", "#SBATCH --mail-user=jdoe@example.org", "#SBATCH --exclusive",
                 "#SBATCH --reservation='big run $(touch x)'", "#SBATCH --constraint=a100",
                 "#SBATCH --dependency=afterok:4242", "#SBATCH --kill-on-invalid-dep=yes"):
        assert line in directives, directives
    assert f"data: {later} has no manifest yet; expected from job(s) 4242" in out
    # A preprocessing run waits for another job the same way (its plan job does).
    src = tmp_path / "src"
    src.mkdir()
    assert pp_launch.main(["--site", "local", "--cluster", "slurm", "--source", str(src), "--out",
                           str(tmp_path / "o"), "--after", "7", "--dry-run"]) == 0
    plan = _sections(capsys.readouterr().out)["plan"]
    assert "#SBATCH --dependency=afterok:7" in plan
    assert pt_launch.main(["--site", "leonardo", "--after", "12;rm", "--dry-run"]) == 2
    assert "is not a SLURM job id" in capsys.readouterr().err


def test_no_site_on_a_machine_with_slurm_picks_its_profile_or_refuses(tmp_path, shards, monkeypatch, capsys):
    """A fake client (sbatch only) and slurm.conf: what a login node of another cluster looks like."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 'fake sbatch: must not be called' >&2\nexit 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    conf = tmp_path / "slurm.conf"
    monkeypatch.setenv("SLURM_CONF", str(conf))
    common = ["--data", str(shards), "--run-dir", str(tmp_path / "r"), "--dry-run"]
    conf.write_text("ClusterName=othercluster\nSlurmctldHost=x\n")
    assert pt_launch.main(common) == 2
    err = capsys.readouterr().err
    assert "this machine has SLURM (cluster othercluster) and no --site was given: pass --site NAME" in err
    conf.write_text("ClusterName=leonardo\n")
    assert pt_launch.main(["--account", "p", *common]) == 0
    captured = capsys.readouterr()
    assert "site: leonardo (this machine is SLURM cluster 'leonardo'" in captured.err
    assert "#SBATCH --partition=boost_usr_prod" in captured.out
    assert not (tmp_path / "r").exists()


def test_hidden_path_keeps_every_other_program(tmp_path):
    """The PATH builder itself: a folder holding sbatch is mirrored without it, everything else stays."""
    from _launch_fixtures import hidden_slurm_path

    folder = tmp_path / "usr_bin"
    folder.mkdir()
    for name in ("sbatch", "sinfo", "python3", "sh"):
        (folder / name).write_text("#!/bin/sh\n")
        (folder / name).chmod(0o755)
    other = tmp_path / "other"
    other.mkdir()
    hidden = hidden_slurm_path(tmp_path / "mirror", os.pathsep.join([str(folder), str(other)]))
    first, second = hidden.split(os.pathsep)
    assert second == str(other) and first != str(folder)
    assert sorted(p.name for p in Path(first).iterdir()) == ["python3", "sh"]


@pytest.mark.skipif(any(Path(m).exists() for m in ("/leonardo_work", "/leonardo_scratch")),
                    reason="this machine has Leonardo's file systems: nothing to note")
def test_laptop_dry_run_notes_the_sites_file_systems_instead_of_refusing(tmp_path, monkeypatch, capsys):
    """From a laptop, paths on Leonardo's file systems cannot be checked: noted, not refused; other paths are."""
    monkeypatch.setenv("CINECA_SCRATCH", "/leonardo_scratch/large/userexternal/jdoe")
    code = pt_launch.main(["--site", "leonardo", "--account", "p", "--nodes", "16", "--data",
                           "/leonardo_work/P/majortom/shards", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "--data /leonardo_work/P/majortom/shards: not checked, /leonardo_work is not on this machine" in out
    assert "--run-dir /leonardo_scratch/large/userexternal/jdoe/phileo/runs/" in out
    assert "all checks that can run here passed (3 not run here: see above)" in out
    # A path this machine should have is still refused.
    assert pt_launch.main(["--site", "leonardo", "--account", "p", "--data", str(tmp_path / "nope"),
                           "--run-dir", str(tmp_path / "r"), "--dry-run"]) == 2
    assert "manifest.json not found" in capsys.readouterr().out
