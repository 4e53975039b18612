"""The requeue machinery of the job callables, with a stand-in training entry point (no torch, seconds)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from phileo.launch.jobs import PretrainJob, TrainingJob
from phileo.launch.resources import resolve_resources
from phileo.launch.sites import load_site
from phileo.launch.submit import make_plan, read_task_result, submit, wait_for

HELPERS = Path(__file__).parent / "helpers"
REPO = Path(__file__).resolve().parents[1]
FAKE = ("launch_fake_entry:fake_train", "launch_fake_entry:FakeConfig")


@pytest.fixture
def job_pythonpath(monkeypatch):
    """The job's processes (and this one, to read their results) import the stand-in entry point."""
    monkeypatch.syspath_prepend(str(HELPERS))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(HELPERS), str(REPO), os.environ.get("PYTHONPATH")) if p))


def test_checkpoint_counts_requeues_and_stops_at_the_bound():
    job = PretrainJob({"run": {"dir": "/r"}}, max_requeues=2)
    first = job.checkpoint()
    assert first.function.requeue_count == 1 and first.function.max_requeues == 2
    assert isinstance(first.function, PretrainJob) and first.function.config == job.config
    second = first.function.checkpoint()
    assert second.function.requeue_count == 2
    assert second.function.checkpoint() is None  # the bound: submitit then does not requeue


@pytest.mark.slow
def test_local_job_is_signalled_requeued_and_resumes(tmp_path, job_pythonpath):
    """Two local processes get USR2 before the time limit, stop, are restarted by the controller, and finish.

    A second job with max_requeues=0 is signalled the same way and ends "preempted" instead of requeueing.
    """
    site = load_site("local")
    # A 1-minute limit with USR2 52 s before it: the signal comes ~8 s in; the work takes ~10 s.
    res = resolve_resources(site, gpus_per_node=2, time="1", signal_delay_s=52)
    runs = {"requeue": tmp_path / "requeue", "bounded": tmp_path / "bounded"}
    jobs = {}
    for name, run in runs.items():
        plan = make_plan("local", site, res, run / "logs")
        fn = TrainingJob(*FAKE, {"dir": str(run), "steps": 40, "step_s": 0.25},
                         max_requeues=2 if name == "requeue" else 0)
        jobs[name] = submit(plan, fn)
    wait_for(list(jobs.values()), timeout_s=150, poll_s=0.5)

    state, result = read_task_result(jobs["requeue"], 0)
    assert state == "success", result
    assert (result.status, result.step) == ("completed", 40)
    starts = [json.loads(p.read_text()) for p in sorted(runs["requeue"].glob("start_rank0_*.json"))]
    assert len(starts) == 2, "expected one requeue"
    assert starts[0]["step"] == 0 and 0 < starts[1]["step"] < 40  # the second run resumed mid-way
    env = starts[0]["env"]
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "2" and env["MASTER_ADDR"] == "127.0.0.1"
    rank1 = json.loads((runs["requeue"] / "start_rank1_0.json").read_text())["env"]
    assert rank1["RANK"] == "1" and rank1["MASTER_PORT"] == env["MASTER_PORT"]

    state, result = read_task_result(jobs["bounded"], 0)
    assert state == "success" and result.status == "preempted" and 0 < result.step < 40
    assert len(list(runs["bounded"].glob("start_rank0_*.json"))) == 1
    log = "".join(p.read_text() for p in (runs["bounded"] / "logs").glob("*_0_log.err"))
    assert "NOT requeued" in log and "max_requeues=0" in log


@pytest.mark.slow
def test_launch_finetune_runs_one_fine_tuning_locally(tmp_path):
    """jobs/launch_finetune.py --cluster local --wait: FinetuneJob runs run_finetuning and reports its result."""
    import subprocess
    import sys

    from phileo.bench.synthetic import make_bench_data

    bench = tmp_path / "bench"
    make_bench_data(bench, regions=("europe", "japan"), patches_per_file=4, val_patches_per_file=2, patch_size=32)
    run = tmp_path / "ft"
    res = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "launch_finetune.py"), "--site", "local", "--cluster", "local",
         "--model", "phileo_cnn_tiny", "--task", "building", "--n-shot", "4", "--data", str(bench), "--run-dir",
         str(run), "--wait", "model.overrides={img_size: 32}", "finetune.max_epochs=1", "finetune.warmup_epochs=0",
         "data.batch_size=4", "data.num_workers=0", "run.tensorboard=false"],
        capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "status=completed" in res.stdout
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "completed" and result["task"] == "building"
    launch = json.loads((run / "launch.json").read_text())
    assert launch["kind"] == "finetune" and launch["resources"]["tasks_per_node"] == 1
