"""Batch-script generation: the golden Leonardo script, safe quoting, arrays within MaxArraySize."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

from phileo.launch.arrays import split_for_arrays, site_max_array_size
from phileo.launch.resources import resolve_resources
from phileo.launch.scripts import local_environment, log_folder, render_sbatch, slurm_parameters
from phileo.launch.sites import load_site

GOLDEN = Path(__file__).parent / "golden"


def _directives(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("#SBATCH")]


def test_leonardo_16_nodes_matches_the_golden_script():
    site = load_site("leonardo")
    res = resolve_resources(site, nodes=16, account="AIFAC_P01", job_name="phileo-pretrain")
    logs = log_folder("/leonardo_scratch/large/userexternal/jdoe/phileo/runs/pretrain-16n")
    text = render_sbatch(slurm_parameters(site, res, folder=logs, python="@PYTHON@"), logs, python="@PYTHON@")
    expected = (GOLDEN / "leonardo_pretrain_16n.sbatch").read_text().replace("@LOGS@", str(logs))
    assert _directives(text) == _directives(expected)
    assert text.strip() == expected.strip()


def test_gpu_request_and_task_layout_follow_the_flags():
    site = load_site("leonardo")
    res = resolve_resources(site, nodes=2, gpus_per_node=2, account="p", qos="boost_qos_dbg", time="00:30:00")
    d = _directives(render_sbatch(slurm_parameters(site, res), "/x/logs"))
    assert "#SBATCH --gres=gpu:2" in d and "#SBATCH --ntasks-per-node=2" in d
    # Two of four GPUs: their share of the node's cores and memory, so other jobs can use the rest.
    assert "#SBATCH --cpus-per-task=8" in d and "#SBATCH --mem=247000M" in d
    assert "#SBATCH --time=30" in d and "#SBATCH --qos=boost_qos_dbg" in d
    # A CPU-only site asks for no GPU at all (a gres request would be refused there).
    local = load_site("local")
    d = _directives(render_sbatch(slurm_parameters(local, resolve_resources(local, nodes=2)), "/x/logs"))
    assert not any("gres" in x for x in d) and "#SBATCH --partition=debug" in d
    assert not any("--account" in x or "--qos" in x or "--wckey" in x for x in d)


def _fake_srun(bin_dir: Path, record: Path) -> None:
    """An `srun` that records its argv (NUL-separated) instead of starting tasks."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    srun = bin_dir / "srun"
    srun.write_text(f"#!/bin/sh\nprintf '%s\\0' \"$@\" > {shlex.quote(str(record))}\n"
                    f"env > {shlex.quote(str(record))}.env\n")
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)


def test_hostile_job_name_and_run_dir_neither_break_nor_inject(tmp_path):
    """A job name and run folder with spaces, both quote kinds and $(...) reach srun intact and run nothing."""
    canary = tmp_path / "CANARY"
    hostile = f"it's a \"test\" $(touch {canary}) `touch {canary}`"
    run_dir = tmp_path / f"run dir 'q' \"dq\" $(touch {canary})"
    site = load_site("local")
    res = resolve_resources(site, nodes=2, job_name=hostile)
    text = render_sbatch(slurm_parameters(site, res, extra_env={"PHILEO_NOTE": hostile}), log_folder(run_dir))
    script = tmp_path / "job.sh"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    record = tmp_path / "argv"
    _fake_srun(tmp_path / "bin", record)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_CPUS_PER_TASK": "1"}
    subprocess.run(["bash", str(script)], check=True, env=env, cwd=tmp_path)
    assert not canary.exists(), "the generated script executed part of a user value"
    argv = record.read_bytes().split(b"\0")[:-1]
    argv = [a.decode() for a in argv]
    assert argv[argv.index("--output") + 1] == f"{run_dir}/logs/%j_%t_log.out"
    assert argv[-1] == f"{run_dir}/logs" and "--kill-on-bad-exit=1" in argv
    job_env = dict(line.split("=", 1) for line in Path(f"{record}.env").read_text().splitlines() if "=" in line)
    assert job_env["PHILEO_NOTE"] == hostile and job_env["SRUN_CPUS_PER_TASK"] == "1"
    assert job_env["OMP_NUM_THREADS"] == "1"  # the site's $SLURM_CPUS_PER_TASK expanded on the node
    # The #SBATCH line carries the name shell-quoted: sbatch's parser reads it back as the same words.
    (name_line,) = [x for x in _directives(text) if x.startswith("#SBATCH --job-name=")]
    assert shlex.split(name_line.split("=", 1)[1]) == [hostile]


def test_local_environment_expands_slurm_variables_to_the_request():
    site = load_site("local")
    env = local_environment(site, resolve_resources(site, cpus_per_task=2, gpus_per_node=1))
    assert env["OMP_NUM_THREADS"] == "2" and env["DS_ACCELERATOR"] == "cpu"


def test_arrays_are_split_at_max_array_size():
    groups = split_for_arrays(list(range(2500)), 1001)
    assert [len(g) for g in groups] == [1001, 1001, 498]
    assert sum(groups, []) == list(range(2500))
    assert split_for_arrays(range(5), 5) == [[0, 1, 2, 3, 4]]
    assert split_for_arrays([], 10) == []
    with pytest.raises(ValueError):
        split_for_arrays([1], 0)


def test_max_array_size_from_profile_or_default(monkeypatch):
    site = load_site("local")
    site.max_array_size = 7
    assert site_max_array_size(site) == 7
    site.max_array_size = None
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: SLURM's default
    assert site_max_array_size(site) == 1001


def test_array_script_has_the_array_directive():
    site = load_site("local")
    params = slurm_parameters(site, resolve_resources(site), array_parallelism=4)
    d = _directives(render_sbatch(params, "/x/logs", map_count=10))
    assert "#SBATCH --array=0-9%4" in d
    assert "#SBATCH --output=/x/logs/%A_%a_0_log.out" in d


def _submitted_by_submitit(tmp_path: Path, params: dict, map_count: int | None, monkeypatch) -> tuple[str, Path]:
    """The script submitit's public SlurmExecutor hands to sbatch, caught by a stand-in sbatch on PATH."""
    import submitit

    bin_dir, caught = tmp_path / "bin", tmp_path / "caught.sh"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text(f'#!/bin/sh\ncp "$1" {shlex.quote(str(caught))}\necho "Submitted batch job 42"\n')
    fake.chmod(0o755)
    # submitit's executor refuses to exist where no srun is found: a stand-in, so this runs without SLURM.
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    folder = tmp_path / "logs"
    ex = submitit.SlurmExecutor(folder=folder, python="@PYTHON@")
    ex.update_parameters(**params)
    if map_count is None:
        ex.submit(print, "x")
    else:
        ex.map_array(print, list(range(map_count)))
    return caught.read_text(), folder


@pytest.mark.parametrize("case", ["leonardo-16n", "array-hostile-extra", "local-dependency"])
def test_dry_run_renderer_writes_what_submitit_submits(tmp_path, monkeypatch, case):
    """render_sbatch restates submitit's (private) script format; this pins it to what submitit's public
    executor really writes, for the parameters the launchers set, so an upgrade that changes it fails here."""
    folder = tmp_path / "logs"  # where _submitted_by_submitit's executor writes: the teardown names it
    if case == "leonardo-16n":
        site = load_site("leonardo")
        params, n = slurm_parameters(site, resolve_resources(site, nodes=16, account="AIFAC_P01"), folder=folder,
                                     python="@PYTHON@"), None
    elif case == "array-hostile-extra":
        site = load_site("leonardo")
        res = resolve_resources(site, account="p", job_name="it's $(rm -rf) `x`", time="00:30:00")
        params = slurm_parameters(site, res, array_parallelism=3,
                                  extra_sbatch={"mail-type": "END,FAIL", "mail-user": "a b@x.eu", "exclusive": True},
                                  extra_env={"NOTE": "a'b \"c\" $HOME"}, folder=folder, python="@PYTHON@")
        n = 7
    else:
        site = load_site("local")
        params, n = slurm_parameters(site, resolve_resources(site, nodes=2), dependency="afterok:17",
                                     requeue=False, folder=folder), None
    submitted, submitit_folder = _submitted_by_submitit(tmp_path, params, n, monkeypatch)
    assert submitit_folder == folder
    assert render_sbatch(params, folder, python="@PYTHON@", map_count=n) == submitted
    assert ("phileo.launch.failover" in submitted) == (case != "local-dependency")  # jobs that may requeue
