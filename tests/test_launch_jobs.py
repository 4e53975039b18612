"""The job callable (TrainingJob, its kinds, its requeue machinery), with a stand-in training entry point (no
torch, seconds), stand-in `scontrol` binaries, and submitit's own local executor."""

from __future__ import annotations

import ast
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import submitit
from submitit.helpers import DelayedSubmission

from phileo import exit_codes
from phileo.launch.scripts import SUBMITIT_ENTRY
from phileo.launch.jobs import (JOB_KINDS, JobKind, RequeueRefused, TrainingJob, export_local_rank_env, job_kind,
                                request_requeue, save_resubmission)
from phileo.launch.resources import resolve_resources
from phileo.launch.sites import load_site
from phileo.launch.submit import make_plan, read_task_result, submit, wait_for

HELPERS = Path(__file__).parent / "helpers"
REPO = Path(__file__).resolve().parents[1]
FAKE = JobKind("fake", "launch_fake_entry:fake_train", "launch_fake_entry:FakeConfig")


@pytest.fixture
def job_pythonpath(monkeypatch):
    """The job's processes (and this one, to read their results) import the stand-in entry point."""
    monkeypatch.syspath_prepend(str(HELPERS))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(HELPERS), str(REPO), os.environ.get("PYTHONPATH")) if p))


def test_checkpoint_counts_requeues_and_stops_at_the_bound():
    job = TrainingJob("pretrain", {"config": {"run": {"dir": "/r"}}}, max_requeues=2)
    first = job.checkpoint()
    assert first.function.requeue_count == 1 and first.function.max_requeues == 2
    assert first.function.kind is JOB_KINDS["pretrain"] and first.function.payload == job.payload
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
        fn = TrainingJob(FAKE, {"config": {"dir": str(run), "steps": 40, "step_s": 0.25}},
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
    """jobs/launch_finetune.py --cluster local --wait: TrainingJob("finetune") runs run_finetuning and reports
    its result."""
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


# ------------------------------------------------------------------------------------------ the job kinds
def test_registry_holds_the_four_job_kinds_and_each_entry_imports():
    assert set(JOB_KINDS) == {"pretrain", "finetune", "sweep_task", "preprocess_task"}
    for kind in JOB_KINDS.values():
        module, _, name = kind.entry.partition(":")
        assert callable(getattr(__import__(module, fromlist=[name]), name)), kind.entry
        if kind.config_class:
            module, _, name = kind.config_class.partition(":")
            assert isinstance(getattr(__import__(module, fromlist=[name]), name), type), kind.config_class
    assert [k for k, v in JOB_KINDS.items() if not v.requeue] == ["preprocess_task"]
    with pytest.raises(ValueError, match="unknown job kind 'pretrian': use one of pretrain, finetune"):
        job_kind("pretrian")


def test_each_kind_says_how_to_continue_with_its_own_payload():
    assert TrainingJob("pretrain", {"config": {"run": {"dir": "/runs/a"}}}).how_to_continue == \
        "resubmit with --resume /runs/a"
    sweep = TrainingJob("sweep_task", {"sweep_path": "s.yaml", "index": 3, "out_dir": "/sw"})
    assert "jobs/launch_sweep.py s.yaml --out /sw" in sweep.how_to_continue
    assert TrainingJob(FAKE, {"config": {}}).how_to_continue == "re-submit the same command"


def test_preprocess_kind_runs_a_command_and_never_requeues(tmp_path):
    out = tmp_path / "touched"
    job = TrainingJob("preprocess_task", {"argv": [sys.executable, "-c", f"open({str(out)!r}, 'w').write('x')"]},
                      max_requeues=5)
    assert job.kind.call(job.payload) == 0 and out.read_text() == "x"
    assert job.checkpoint() is None  # submitit's own handler then does not requeue it either
    failing = TrainingJob("preprocess_task", {"argv": [sys.executable, "-c", "raise SystemExit(3)"]})
    with pytest.raises(subprocess.CalledProcessError):
        failing.kind.call(failing.payload)
    assert "argv=" in repr(job) and "preprocess_task" in repr(job)


# ------------------------------------------------------------------ requeue without submitit's private API
def _fake_scontrol(tmp_path, monkeypatch, rc=0, stderr=""):
    """A stand-in `scontrol` first on PATH that records its arguments (the real one is tested on the cluster)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "scontrol_calls"
    script = bindir / "scontrol"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\necho {stderr!r} >&2\nexit {rc}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return calls


def test_slurm_requeue_asks_scontrol_for_this_job(tmp_path, monkeypatch):
    calls = _fake_scontrol(tmp_path, monkeypatch)
    request_requeue("slurm", "123_4")  # an array task's id, as submitit's JobEnvironment.job_id gives it
    assert calls.read_text().split() == ["requeue", "123_4"]


def test_a_refused_requeue_says_why(tmp_path, monkeypatch):
    _fake_scontrol(tmp_path, monkeypatch, rc=1, stderr="Job has already finished")
    with pytest.raises(RequeueRefused, match="scontrol requeue 7: Job has already finished"):
        request_requeue("slurm", "7")
    with pytest.raises(RequeueRefused, match="'debug' executor"):
        request_requeue("debug", "7")


def test_local_requeue_exits_with_the_code_submitits_controller_restarts_on():
    from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

    with pytest.raises(SystemExit) as e:
        request_requeue("local", "1")
    assert e.value.code == exit_codes.LOCAL_REQUEUE == LOCAL_REQUEUE_RETURN_CODE


def test_resubmission_replaces_the_function_and_keeps_submitits_timeout(tmp_path):
    job = TrainingJob("pretrain", {"config": {"run": {"dir": "/r"}}}, max_requeues=4)
    pickle_path = tmp_path / "7_submitted.pkl"
    delayed = DelayedSubmission(job)
    delayed.set_timeout(90, 4)  # what submitit's executor writes at submission
    delayed.dump(pickle_path)
    save_resubmission(pickle_path, job.resubmission())
    again = DelayedSubmission.load(pickle_path)
    assert again.function.requeue_count == 1 and again.function.payload == job.payload
    # Read back only to check we kept them (phileo itself never touches submitit's private fields).
    assert (again._timeout_min, again._timeout_countdown) == (90, 4)
    assert list(tmp_path.iterdir()) == [pickle_path]  # written atomically: no temporary left


def test_local_tasks_drop_an_outer_srun_steps_placement(monkeypatch):
    """`srun --pty bash` then a local launch: the outer step's SLURM_PROCID would otherwise place every task."""
    for k, v in {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(k, v)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)  # so that monkeypatch removes what the export sets, after the test
    env = type("Env", (), {"job_id": "42", "global_rank": 1, "local_rank": 1, "num_tasks": 2})()
    export_local_rank_env(env)
    from phileo.train.dist import detect_layout

    info = detect_layout()
    assert (info.source, info.global_rank, info.world_size) == ("torchrun", 1, 2)


def _private_submitit_uses(path: Path) -> list[str]:
    """`from submitit... import _x`, `submitit._x.y` imports, and the private names submitit defines used as
    `._name` or `getattr(obj, "_name")`."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:  # instances too: their private fields are set in __init__
        instances = (DelayedSubmission(print), submitit.core.core.Job(folder, "1", tasks=(0, 1)))
        private = {n for obj in (submitit.JobEnvironment, DelayedSubmission, submitit.core.core.Job,
                                 submitit.SlurmExecutor, submitit.LocalExecutor, submitit.helpers.Checkpointable,
                                 *instances)
                   for n in [*dir(obj), *getattr(obj, "__dict__", {})] if n.startswith("_") and not n.endswith("__")}
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("submitit"):
            bad = [a.name for a in node.names if a.name.startswith("_")]
            if bad or any(part.startswith("_") for part in node.module.split(".")):
                names = ", ".join(a.name for a in node.names)
                found.append(f"{path.name}:{node.lineno} from {node.module} import {names}")
        elif isinstance(node, ast.Attribute) and node.attr in private:
            found.append(f"{path.name}:{node.lineno} .{node.attr}")
        elif isinstance(node, ast.Constant) and node.value in private:  # getattr(job, "_sub_jobs")
            found.append(f"{path.name}:{node.lineno} {node.value!r}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "submitit.core._" in node.value \
                and node.value != SUBMITIT_ENTRY:  # the one module name every submitit batch script runs
            found.append(f"{path.name}:{node.lineno} {node.value!r}")
    return found


def test_no_private_submitit_name_in_phileo():
    """Only submitit's public API: no private import, attribute or getattr name. The dry-run renderer names
    submitit's entry module (SUBMITIT_ENTRY) as a string, because the script it shows must be the one queued."""
    assert [u for p in sorted((REPO / "phileo").rglob("*.py")) for u in _private_submitit_uses(p)] == []


@pytest.mark.slow
def test_a_failure_is_retried_up_to_max_failures_then_the_run_says_failed(tmp_path, job_pythonpath):
    """submitit's local executor: a job whose first 2 starts raise finishes with max_failures=3; one that always
    raises ends after 1 retry with state.json "failed" and a one-line reason."""
    site = load_site("local")
    res = resolve_resources(site, gpus_per_node=1, time="5")
    runs = {"retried": (tmp_path / "retried", 3), "gives_up": (tmp_path / "gives_up", 1)}
    jobs = {}
    for name, (run, max_failures) in runs.items():
        fn = TrainingJob(FAKE, {"config": {"dir": str(run), "steps": 3, "step_s": 0.05, "fail_starts": 2 if
                                           name == "retried" else 99}}, max_failures=max_failures)
        jobs[name] = submit(make_plan("local", site, res, run / "logs"), fn)
    wait_for(list(jobs.values()), timeout_s=150, poll_s=0.5)
    state, result = read_task_result(jobs["retried"], 0)
    assert state == "success" and (result.status, result.step) == ("completed", 3)
    record = json.loads((runs["retried"][0] / "state.json").read_text())
    assert record["failures"] == 2 and [e["event"] for e in record["events"]] == ["failure", "failure"]
    assert len(list(runs["retried"][0].glob("start_rank0_*.json"))) == 3
    record = json.loads((runs["gives_up"][0] / "state.json").read_text())
    assert record["state"] == "failed" and record["failures"] == 2
    assert record["reason"].startswith("failed 2 time(s) in a row since the last checkpoint (retried 1 times, "
                                       "--max-failures); last: RuntimeError: injected failure at start 1. Fix the "
                                       "cause")
    assert len(list(runs["gives_up"][0].glob("start_rank0_*.json"))) == 2
