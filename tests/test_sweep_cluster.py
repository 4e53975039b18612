"""`sbatch slurm/finetune_array.sh` on the dev SLURM cluster: a tiny sweep as a real job array, one task broken
on purpose, results collected, the broken task re-run alone."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from phileo.bench.synthetic import make_bench_data
from phileo.launch.slurm import sbatch, wait_for_job_id
from phileo import run_lock
from phileo.bench.sweep import expand_sweep, task_dir, task_finished

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "finetune_array.sh"
BROKEN = 3


def _logs(tmp_path: Path) -> str:
    return "\n".join(f"--- {p.name} ---\n{p.read_text()[-2000:]}" for p in sorted(tmp_path.glob("slurm-*.out")))


def test_sweep_as_a_job_array_with_a_failed_task(tmp_path, slurm_cluster):
    data = tmp_path / "data"
    make_bench_data(data, regions=("europe", "japan"), patches_per_file=3, val_patches_per_file=2, patch_size=32)
    sweep = tmp_path / "tiny.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "tiny",
        "base": {"data.root": "${BENCH_DATA}", "data.batch_size": 2, "data.num_workers": 0,
                 "model.overrides": {"img_size": 32}, "finetune.max_epochs": 2, "finetune.warmup_epochs": 1,
                 "run.tensorboard": False},
        "models": [{"label": "tiny_scratch", "model.name": "phileo_cnn_tiny"}],
        "tasks": ["building", "lc"], "n_shots": [2], "lrs": [1.0e-3, 1.0e-2], "seeds": [0]}, sort_keys=False))
    specs = expand_sweep(sweep)
    assert len(specs) == 4
    out = tmp_path / "sweep"
    # Task 3's folder is held by another live writer (a run.lock of this very process): it must fail visibly
    # rather than train into a folder somebody else writes. (A damaged checkpoint no longer fails a task: it is
    # set aside or ignored, and the task goes on; tests/test_train_components.py shows that.)
    bad = task_dir(out, BROKEN) / run_lock.LOCK_FILE
    bad.parent.mkdir(parents=True)
    bad.write_text(json.dumps({**run_lock.this_owner(), "job_id": None}))

    env = {**slurm_cluster.env(), "PHILEO_SETUP": "none", "PHILEO_SWEEP": str(sweep), "PHILEO_SWEEP_DIR": str(out),
           "PHILEO_PYTHON": sys.executable, "PHILEO_REPO": str(REPO), "BENCH_DATA": str(data),
           "OMP_NUM_THREADS": "1"}
    common = ["--cpus-per-task=1", f"--output={tmp_path}/slurm-%A_%a.out", "--chdir", str(REPO)]
    job = sbatch(SCRIPT, ["--array=0-3", *common], env=env)
    wait_for_job_id(job, timeout_s=300, poll_s=1)

    finished = [s.index for s in specs if task_finished(out, s.index)]
    assert finished == [i for i in range(4) if i != BROKEN], _logs(tmp_path)
    failure = json.loads((task_dir(out, BROKEN) / "failed.json").read_text())
    assert "in use by" in failure["error"] and failure["slurm_array_task_id"] == str(BROKEN)

    collect = [sys.executable, str(REPO / "jobs" / "collect_results.py"), str(out)]
    proc = subprocess.run(collect, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"failed array tasks: {BROKEN}" in proc.stdout and f"--array={BROKEN} " in proc.stdout
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["status"] for r in rows] == ["failed" if i == BROKEN else "completed" for i in range(4)]
    assert all(float(r["test_rmse"]) > 0 for r in rows if r["task"] == "building" and r["status"] == "completed")
    md = (out / "results.md").read_text()
    assert "## building: test RMSE" in md and "## lc: test accuracy" in md
    assert f"Failed (1): indices {BROKEN}" in md
    for name in ("building_rmse.png", "lc_overall_accuracy.png"):
        assert (out / "plots" / name).read_bytes()[:4] == b"\x89PNG"

    # The fix, then the failed task re-run alone next to a finished one (which must not run again).
    bad.unlink()
    result_0 = task_dir(out, 0) / "result.json"
    stamp = result_0.stat().st_mtime_ns
    job = sbatch(SCRIPT, [f"--array=0,{BROKEN}", *common], env=env)
    wait_for_job_id(job, timeout_s=180, poll_s=1)
    assert task_finished(out, BROKEN), _logs(tmp_path)
    assert not (task_dir(out, BROKEN) / "failed.json").exists()
    assert result_0.stat().st_mtime_ns == stamp
    assert "already finished" in (tmp_path / f"slurm-{job}_0.out").read_text()
    proc = subprocess.run(collect + ["--strict"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "4 completed" in proc.stdout, proc.stdout + proc.stderr


def test_pre_timeout_signal_checkpoints_and_requeues_the_array_task(tmp_path, slurm_cluster):
    """USR2 (what --signal=USR2@180 sends before the time limit) reaches the training process through srun; it
    saves a checkpoint and exits 75, the script requeues its own array task, which resumes and finishes."""
    import time

    data = tmp_path / "data"
    make_bench_data(data, regions=("europe",), patches_per_file=6, val_patches_per_file=2, patch_size=32)
    sweep = tmp_path / "one.yaml"
    sweep.write_text(yaml.safe_dump({
        "base": {"data.root": str(data), "data.batch_size": 2, "data.num_workers": 0,
                 "model.overrides": {"img_size": 32}, "finetune.max_epochs": 20, "finetune.patience_epochs": 20,
                 "finetune.warmup_epochs": 1, "run.tensorboard": False, "run.log_every_steps": 1},
        "models": ["phileo_cnn_tiny"], "tasks": ["building"], "n_shots": [4], "lrs": [1.0e-3], "seeds": [0]}))
    out = tmp_path / "sweep"
    env = {**slurm_cluster.env(), "PHILEO_SETUP": "none", "PHILEO_SWEEP": str(sweep), "PHILEO_SWEEP_DIR": str(out),
           "PHILEO_PYTHON": sys.executable, "PHILEO_REPO": str(REPO), "OMP_NUM_THREADS": "1"}
    job = sbatch(SCRIPT, ["--array=0", "--cpus-per-task=1", f"--output={tmp_path}/slurm-%A_%a.out",
                          "--chdir", str(REPO)], env=env)
    metrics = task_dir(out, 0) / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and "loss/total" in metrics.read_text()):
        assert time.monotonic() < deadline, _logs(tmp_path)
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", f"{job}_0"], check=True, env=env)
    wait_for_job_id(job, timeout_s=240, poll_s=1)
    log_text = (tmp_path / f"slurm-{job}_0.out").read_text()
    assert task_finished(out, 0), _logs(tmp_path)
    assert "requeueing" in log_text and "(restart 1)" in log_text, log_text[-3000:]
    run_log = (task_dir(out, 0) / "log.txt").read_text()
    assert "stop signal SIGUSR2" in run_log and "resuming from" in run_log
    result = json.loads((task_dir(out, 0) / "result.json").read_text())
    assert result["epochs_run"] == 20 and result["steps"] == 20 * result["steps_per_epoch"]
