"""The launchers' command lines without a cluster: --dry-run output (golden for Leonardo at 16 nodes), the
flag -> config mapping, refusals and their exit codes. They pass whether or not SLURM is installed here (a dry
run needs no SLURM; tests/test_launch_no_slurm.py runs them with the SLURM client hidden)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from phileo.launch import finetune as ft_launch
from phileo.launch import pretrain as pt_launch
from phileo.launch import preprocess as pp_launch
from _launch_fixtures import write_bench, write_manifest

GOLDEN = Path(__file__).parent / "golden"
REPO = Path(__file__).resolve().parents[1]


def _sections(text: str) -> dict[str, str]:
    """'# ---- name ... ----' headed sections of a dry run."""
    out, name = {}, None
    for line in text.splitlines(keepends=True):
        if line.startswith("# ---- "):
            name = line[7:].split(" ")[0].split("(")[0].strip()
            out[name] = ""
        elif name is not None:
            out[name] += line
    return out


@pytest.fixture
def shards(tmp_path):
    """A converted set of 64 chunks (manifest.json and chunk files of the recorded sizes)."""
    return write_manifest(tmp_path / "shards", 64)


def test_leonardo_16_node_dry_run_is_the_golden_script(tmp_path, capsys, shards):
    run = tmp_path / "runs" / "pretrain-16n"
    code = pt_launch.main(["--site", "leonardo", "--cluster", "slurm", "--account", "AIFAC_P01", "--nodes", "16",
                           "--model", "phileo_cnn_44m", "--data", str(shards), "--steps", "200000",
                           "--batch-size", "16", "--run-dir", str(run), "--dry-run", "optim.lr=3e-4"])
    out = capsys.readouterr().out
    assert code == 0, out
    parts = _sections(out)
    expected = (GOLDEN / "leonardo_pretrain_16n.sbatch").read_text()
    expected = expected.replace("@LOGS@", str(run / "logs")).replace("@PYTHON@", sys.executable)
    assert parts["batch"].strip() == expected.strip()
    cfg = yaml.safe_load(parts["resolved"])
    assert cfg["model"]["name"] == "phileo_cnn_44m" and cfg["train"]["steps"] == 200000
    assert cfg["data"]["batch_size"] == 16 and cfg["data"]["root"] == str(shards)
    assert cfg["data"]["num_workers"] == 7  # 8 cores per task minus the training process
    assert cfg["run"]["dir"] == str(run) and cfg["optim"]["lr"] == pytest.approx(3e-4)
    assert "384 node-hours (1536 GPU-hours)" in parts["preflight"]
    assert "64 chunks for 16 node(s)" in parts["preflight"] and "preflight ERROR" not in parts["preflight"]
    assert not run.exists(), "a dry run must write nothing"


def test_flags_overrides_and_config_file_layer_in_order(tmp_path, capsys, shards):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"train": {"strategy": "zero1", "seed": 1}, "optim": {"lr": 1e-3},
                                    "data": {"num_workers": 2}}))
    code = pt_launch.main(["--site", "local", "--cluster", "local", "--config", str(base), "--strategy", "zero2",
                           "--data", str(shards), "--run-dir", str(tmp_path / "r"), "--dry-run",
                           "optim.lr=5e-4", "train.grad_accum_steps=4"])
    cfg = yaml.safe_load(_sections(capsys.readouterr().out)["resolved"])
    assert code == 0
    assert cfg["train"]["strategy"] == "zero2"  # flag over file
    assert cfg["train"]["seed"] == 1 and cfg["data"]["num_workers"] == 2  # file over defaults and site
    assert cfg["optim"]["lr"] == pytest.approx(5e-4) and cfg["train"]["grad_accum_steps"] == 4  # overrides last


def test_refusals_exit_2_and_say_what_to_change(tmp_path, capsys, shards):
    # Over the QOS limit: the dry run still shows the script, and the error says which QOS fits.
    code = pt_launch.main(["--site", "leonardo", "--cluster", "slurm", "--account", "p", "--nodes", "16",
                           "--qos", "boost_qos_dbg", "--data", str(shards), "--run-dir", str(tmp_path / "r"),
                           "--dry-run"])
    out = capsys.readouterr().out
    assert code == 2 and "#SBATCH --nodes=16" in out
    assert "preflight ERROR: 16 nodes and --time 1-00:00:00 do not fit QOS boost_qos_dbg" in out
    # Unknown config key: named, with the closest valid one.
    code = pt_launch.main(["--site", "local", "--cluster", "local", "--data", str(tmp_path), "--run-dir",
                           str(tmp_path / "r"), "optim.lrr=1"])
    assert code == 2 and "Did you mean 'lr'" in capsys.readouterr().err
    # --resume of a folder that is not a run.
    code = pt_launch.main(["--resume", str(tmp_path), "--cluster", "local"])
    assert code == 2 and "not a run folder" in capsys.readouterr().err
    # Local mode is one machine.
    code = pt_launch.main(["--site", "local", "--cluster", "local", "--nodes", "2", "--data", str(shards),
                           "--run-dir", str(tmp_path / "r")])
    assert code == 2 and "--cluster local runs on this one machine" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_finetune_flags_map_onto_the_finetune_config(tmp_path, capsys):
    bench = write_bench(tmp_path / "bench")
    code = ft_launch.finetune_main(["--site", "leonardo", "--cluster", "slurm", "--account", "p", "--model",
                                    "phileo_vit_100m", "--task", "lc", "--n-shot", "100", "--lr", "1e-4",
                                    "--data", str(bench), "--run-dir", str(tmp_path / "ft"), "--dry-run",
                                    "finetune.max_epochs=5"])
    parts = _sections(capsys.readouterr().out)
    assert code == 0, parts.get("preflight")
    assert "#SBATCH --gres=gpu:1" in parts["batch"] and "#SBATCH --cpus-per-task=8" in parts["batch"]
    cfg = yaml.safe_load(parts["resolved"])
    assert (cfg["model"]["name"], cfg["data"]["task"], cfg["data"]["n_shot"]) == ("phileo_vit_100m", "lc", 100)
    assert cfg["optim"]["lr"] == pytest.approx(1e-4) and cfg["finetune"]["max_epochs"] == 5


@pytest.fixture
def bench_env(tmp_path, monkeypatch):
    """What the default sweep reads: $PHILEO_BENCH_DATA (a bench folder), $PHILEO_WEIGHTS (the three weights)."""
    weights = tmp_path / "weights"
    weights.mkdir()
    for name in ("phileo_cnn_44m", "phileo_cnn_200m", "phileo_vit_100m"):
        (weights / f"{name}.pt").write_bytes(b"weights")
    monkeypatch.setenv("PHILEO_BENCH_DATA", str(write_bench(tmp_path / "bench")))
    monkeypatch.setenv("PHILEO_WEIGHTS", str(weights))
    return weights


def test_sweep_dry_run_is_one_array_split_only_at_max_array_size(tmp_path, capsys, bench_env):
    sweep = REPO / "slurm" / "sweeps" / "phileo_bench.yaml"
    args = [str(sweep), "--site", "leonardo", "--cluster", "slurm", "--account", "p", "--out", str(tmp_path),
            "--dry-run"]
    assert ft_launch.sweep_main(args + ["--max-array-size", "1001"]) == 0
    out = capsys.readouterr().out
    assert out.count("#SBATCH --array=") == 1 and "#SBATCH --array=0-359%32" in out
    assert ft_launch.sweep_main(args + ["--max-array-size", "100", "--parallel", "8"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-99%8" in out and "array 4/4: sweep tasks 300-359" in out
    assert "--array=0-59%8 and --dependency=afterany:<array 3>" in out
    assert ft_launch.sweep_main(args + ["--indices", "5,7-9"]) == 0
    assert "#SBATCH --array=0-3%4" in capsys.readouterr().out
    assert ft_launch.sweep_main(args + ["--indices", "400"]) == 2
    assert "outside the sweep's 360 tasks" in capsys.readouterr().err


def test_preprocess_dry_run_shows_three_chained_stages(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    code = pp_launch.main(["--site", "leonardo", "--cluster", "slurm", "--account", "p", "--source", str(src),
                           "--out", str(tmp_path / "out"), "--tasks", "8", "--parallel", "4", "--time", "2:00:00",
                           "--dry-run", "--cells-per-chunk", "32"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "#SBATCH --array=0-7%4" in out and "#SBATCH --dependency='afterok:<plan job>'" in out
    assert "#SBATCH --kill-on-invalid-dep=yes" in out and "#SBATCH --gres" not in out
    assert "--task-index 7 --num-tasks 8" in out and "--cells-per-chunk 32" in out and "--merge" in out
    assert not (tmp_path / "out").exists()


def test_resume_keeps_the_runs_config_and_resources(tmp_path, capsys, shards):
    from phileo.config import apply_overrides, save_config
    from phileo.launch.resources import resolve_resources
    from phileo.launch.sites import load_site
    from phileo.launch.submit import update_launch_record
    from phileo.train.config import PretrainConfig

    run = tmp_path / "run"
    cfg = apply_overrides(PretrainConfig(), [f"run.dir={run}", "train.steps=123", f"data.root={shards}",
                                             "model.name=phileo_cnn_tiny"])
    save_config(cfg, run / "config.yaml")
    res = resolve_resources(load_site("local"), gpus_per_node=2, time="45", job_name="mine")
    update_launch_record(run, site="local", cluster="local", resources=res.to_dict(), job_ids=["1"])
    code = pt_launch.main(["--resume", str(run), "--dry-run", "--time", "90", "train.steps=200"])
    parts = _sections(capsys.readouterr().out)
    assert code == 0, parts.get("preflight")
    assert "2 local process(es)" in parts["batch"] and "time limit 90 min" in parts["batch"]
    resumed = yaml.safe_load(parts["resolved"])
    assert resumed["model"]["name"] == "phileo_cnn_tiny" and resumed["train"]["steps"] == 200
    assert resumed["run"]["dir"] == str(run)
