"""phileo-status on real jobs of the dev SLURM cluster, in each state: pending (waiting on a dependency),
running (step, loss, walltime left from squeue), completed (last checkpoint) and failed (its data vanished before
it started: the job dies before the engine could record anything, so only SLURM and the run folder together say
what happened; sacct fails on this cluster, which status survives). Two tiny pretraining jobs, one after the other.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phileo.launch.status import status
from phileo.launch.slurm import wait_for_job_id

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
STEPS = 40
COMMON = ["--cluster", "slurm", "--site", "local", "--nodes", "1", "--gpus-per-node", "1", "--time", "10",
          "--model", "phileo_cnn_tiny", "--steps", str(STEPS), "--batch-size", "2", "optim.warmup_steps=2",
          "run.log_every_steps=2", "run.image_every_steps=0", "checkpoint.every_steps=10", "data.num_workers=0"]


def _submit(*args: str) -> str:
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "launch_pretrain.py"), *COMMON, *args],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return re.search(r"submitted slurm job (\d+)", out.stdout).group(1)


def _cli_json(run: Path) -> dict:
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "status.py"), str(run), "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _until(what, timeout_s: float, why: str):
    deadline = time.monotonic() + timeout_s
    while not (value := what()):
        assert time.monotonic() < deadline, why
        time.sleep(1)
    return value


def test_status_of_real_jobs_in_every_state(tmp_path, slurm_cluster):
    from phileo.data.synthetic import make_pretrain_shards

    shards = make_pretrain_shards(tmp_path / "shards", n_cells=4, nodes=1)
    doomed = tmp_path / "doomed-shards"
    shutil.copytree(shards, doomed)
    good, bad = tmp_path / "good", tmp_path / "bad"
    good_id = _submit("--data", str(shards), "--run-dir", str(good), "--job-name", "status-good")
    bad_id = _submit("--data", str(doomed), "--run-dir", str(bad), "--job-name", "status-bad", "--after", good_id)
    try:
        pending = _cli_json(bad)
        assert pending["state"] == "pending" and pending["job_id"] == bad_id
        assert pending["state_source"] == "squeue" and "Dependency" in (pending["reason"] or "")

        def training():
            s = status(good)
            return s if s["state"] == "running" and s["step"] >= 4 else None

        running = _until(training, 240, f"job {good_id} never showed as running with steps")
        assert running["job_id"] == good_id and 0 < running["step"] < STEPS + 1 and running["total_steps"] == STEPS
        assert running["loss"]["total"] > 0 and running["samples_per_s"] > 0
        assert 0 < running["time_left_s"] <= 600  # --time 10, from squeue

        # The second job's data goes away while it waits: it will fail when it starts.
        shutil.rmtree(doomed / "chunks")
        wait_for_job_id(good_id, timeout_s=400)
        done = _cli_json(good)
        assert done["state"] == "completed" and done["step"] == STEPS
        assert done["last_checkpoint"]["step"] == STEPS and done["last_checkpoint"]["age_s"] < 300
        assert done["bytes"] > 0 and done["node_hours"] > 0

        wait_for_job_id(bad_id, timeout_s=300)
        failed = _cli_json(bad)
        assert failed["state"] == "failed", failed
        assert failed["reason"]
    finally:
        subprocess.run(["scancel", good_id, bad_id], capture_output=True)


def test_results_never_suggest_resubmitting_running_or_pending_tasks(tmp_path, slurm_cluster):
    """A real 4-task array, one at a time (task 0 runs, 1-3 wait), in a 6-task sweep folder where task 4 failed and
    task 5 never started: only 4-5 are to be re-submitted, with the command of the path that launched it."""
    from phileo.bench.results import collect_results, rerun_hint
    from phileo.bench.sweep import record_array
    from phileo.fsutil import atomic_write_json
    from phileo.launch.slurm import sbatch, scancel

    out = tmp_path / "sweep"
    specs = [{"index": i, "model": "m", "task": "roads", "n_shot": 2, "lr": 1e-3, "seed": i} for i in range(6)]
    atomic_write_json(out / "sweep.json", {"name": "honest", "source": str(tmp_path / "s.yaml"), "n_tasks": 6,
                                           "tasks": specs})
    atomic_write_json(out / "tasks" / "00004" / "failed.json", {"error_type": "RuntimeError", "error": "boom"})
    # Task 1 failed in an earlier attempt and is queued again: queued wins over its old failure record.
    atomic_write_json(out / "tasks" / "00001" / "failed.json", {"error_type": "RuntimeError", "error": "old"})
    script = tmp_path / "sleep.sh"
    script.write_text("#!/bin/bash\nsleep 120\n")
    job = sbatch(script, ["--array=0-3%1", "--time=5", f"--output={tmp_path}/%A_%a.out"])
    try:
        record_array(out, job, "finetune_array.sh")
        _until(lambda: collect_results(out).by_status("running"), 60, "array task 0 never ran")
        res = collect_results(out)
        assert [r.index for r in res.by_status("running")] == [0]
        assert [r.index for r in res.by_status("pending")] == [1, 2, 3]
        assert [r.index for r in res.by_status("failed")] == [4] and [r.index for r in res.by_status("missing")] == [5]
        assert rerun_hint(res).startswith("sbatch --array=4-5 ") and "slurm/finetune_array.sh" in rerun_hint(res)
        st_sweep = status(out)
        assert st_sweep["counts"] == {"running": 1, "pending": 3, "failed": 1, "not started": 1}
        record_array(out, job, "launch_sweep", tasks=[0, 1, 2, 3], sweep_path=tmp_path / "s.yaml", site="local")
        assert rerun_hint(collect_results(out)).startswith(
            f"python jobs/launch_sweep.py {tmp_path / 's.yaml'} --out {out.resolve()} --site local --indices 4-5")
    finally:
        scancel(job)
