"""Failures that are not preemptions (phileo.launch.failover), without a cluster: how they are counted in
state.json, when a run is retried, refused or failed, and what the batch script's failover command reads and
does (with stand-in `scontrol` on PATH). The same command on the real dev cluster, after kill -9 of a rank and a
hang: tests/test_fault_cluster.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phileo import exit_codes, run_lock
from phileo.config import ConfigError
from phileo.data.chunk_format import BadChunkError, ChunkReadError
from phileo.launch import failover
from phileo.launch.jobs import RequeueRefused
from phileo.launch.submit import rank_log_cause
from phileo.run_state import is_retryable, read_state, record_final, record_pending, update_state

REPO = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    update_state(run, "running", event="started", job_id="77")
    return run


def _checkpoint(run: Path, step: int) -> None:
    """What the engine records when it has saved a checkpoint."""
    from phileo.train.run_recorder import RunStateRecorder

    RunStateRecorder(run, enabled=True).checkpoint(step, run / "checkpoints" / f"step_{step:08d}")


def test_failures_in_a_row_are_retried_then_the_run_fails_and_progress_restarts_the_count(tmp_path):
    run = _run(tmp_path)
    _checkpoint(run, 100)
    requeued = []
    retry = lambda: requeued.append(1)  # noqa: E731
    for n in (1, 2):
        d = failover.handle_failure(run, 137, 2, "srun: error: node2: task 1: Killed", retry, job_id="77")
        assert (d.action, d.failures) == ("retry", n)
        state = read_state(run)
        assert state["state"] == "requeued" and state["failures"] == n and state["max_failures"] == 2
        assert state["reason"] == "srun: error: node2: task 1: Killed" and state["events"][-1]["event"] == "failure"
    _checkpoint(run, 200)  # the retried job saved a newer checkpoint before failing again: a new count
    d = failover.handle_failure(run, 1, 2, None, retry, job_id="77")
    assert (d.action, d.failures) == ("retry", 1) and d.reason == "the job step ended with exit status 1"
    for _ in range(2):
        d = failover.handle_failure(run, 1, 2, "ValueError: x", retry, job_id="77")
    assert (d.action, d.failures) == ("final", 3) and len(requeued) == 4
    state = read_state(run)
    assert state["state"] == "failed" and state["failures"] == 3
    assert state["reason"] == (f"failed 3 time(s) in a row since the last checkpoint (retried 2 times, "
                               f"--max-failures); last: ValueError: x. Fix the cause (see {run / 'logs'} and "
                               f"log.txt), then resubmit with --resume {run}")
    # A new submission starts the count afresh.
    record_pending(run)
    assert read_state(run)["failures"] == 0
    assert failover.handle_failure(run, 1, 2, None, retry, job_id="77").action == "retry"


def test_a_start_that_asked_for_its_own_requeue_is_left_alone_whatever_srun_says(tmp_path):
    """Preempted: rank 0 recorded "requeued" and asked for it; srun's status may still be non-zero (the other
    ranks were ended by --kill-on-bad-exit). That is no failure. The same event from an earlier start is."""
    run = _run(tmp_path)
    t0 = time.time()
    update_state(run, "requeued", event="requeued", detail="at step 40")
    never = lambda: pytest.fail("requeued twice")  # noqa: E731
    assert failover.handle_failure(run, 137, 3, None, never, job_id="77", since=t0 - 5).action == "none"
    assert failover.handle_failure(run, 137, 3, None, lambda: None, job_id="77", since=t0 + 60).action == "retry"


@pytest.mark.parametrize("code", [exit_codes.OK, exit_codes.PREEMPTED])
def test_completed_and_preempted_steps_are_not_failures(tmp_path, code):
    run = _run(tmp_path)
    d = failover.handle_failure(run, code, 3, None, lambda: pytest.fail("requeued"), job_id="77")
    assert d.action == "none" and read_state(run)["state"] == "running"


def test_what_a_retry_cannot_help_is_not_retried(tmp_path):
    run = _run(tmp_path)
    never = lambda: pytest.fail("requeued")  # noqa: E731
    # The job recorded its own failure as final (a bad config, a corrupt chunk under on_bad_chunk=stop).
    record_final(run, "ConfigError: data.root is not set")
    d = failover.handle_failure(run, 1, 3, "whatever the logs say", never, job_id="77")
    assert d.action == "final" and d.reason == "ConfigError: data.root is not set"
    assert read_state(run)["failures"] == 0
    # A new start of the run makes that record old: a failure after it counts again.
    update_state(run, "running", event="started")
    assert failover.handle_failure(run, 1, 3, None, lambda: None, job_id="77").action == "retry"
    # The entry point refused its command line (exit 2): nothing ran, nothing to retry; the run says so.
    update_state(run, "running", event="started")
    assert failover.handle_failure(run, exit_codes.REFUSED, 3, None, never, job_id="77").action == "final"
    state = read_state(run)
    assert state["state"] == "failed" and state["final"] and "exit status 2" in state["reason"]
    assert not is_retryable(ConfigError("x")) and not is_retryable(run_lock.RunLocked("x"))
    assert not is_retryable(BadChunkError("chunk_00003.h5 does not match its checksum"))
    assert is_retryable(BadChunkError("chunk_00003.h5 unreadable (OSError: ...)", retryable=True))
    assert is_retryable(RuntimeError("gloo: connection closed by peer"))
    assert is_retryable(ChunkReadError("HDF5 filter returned failure reading cell 12U_45R"))


def test_a_run_held_by_another_live_writer_is_left_alone(tmp_path):
    run = _run(tmp_path)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / run_lock.LOCK_FILE).write_text(json.dumps({"job_id": None, "host": os.uname().nodename,
                                                          "pid": other.pid, "time": "t"}))
        before = (run / "state.json").read_text()
        d = failover.handle_failure(run, 1, 3, None, lambda: pytest.fail("requeued"), job_id="78")
        assert d.action == "refused" and f"process {other.pid}" in d.reason
        assert (run / "state.json").read_text() == before  # nothing written into the other job's run
    finally:
        other.kill()
        other.wait()
    # Its own job's lock (rank 0 was killed while holding it) does not stop the retry.
    (run / run_lock.LOCK_FILE).write_text(json.dumps({"job_id": "77", "host": "node1", "pid": 1, "time": "t"}))
    assert failover.handle_failure(run, 137, 3, None, lambda: None, job_id="77").action == "retry"


def test_a_refused_requeue_ends_the_run_as_failed(tmp_path):
    run = _run(tmp_path)

    def refused():
        raise RequeueRefused("scontrol requeue 77: Requested operation is presently disabled for job 77")

    d = failover.handle_failure(run, 137, 3, "task 1: Killed", refused, job_id="77")
    assert d.action == "final" and "the retry was refused: scontrol requeue 77: Requested" in read_state(run)["reason"]
    assert read_state(run)["state"] == "failed"


def test_the_cause_is_read_from_this_start_only(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "12_0_log.err").write_text(
        "submitit INFO - Starting with JobEnvironment(job_id=12, ...)\nOSError: [Errno 28] No space left on device\n"
        "submitit INFO - Starting with JobEnvironment(job_id=12, ...)\nstep lines\n"
        "srun: error: node2: task 1: Killed\n")
    (logs / "123_0_log.err").write_text("MemoryError\n")  # another job whose id starts alike
    assert rank_log_cause(logs, job_id="12") == "12_0_log.err: srun: error: node2: task 1: Killed"
    # srun --kill-on-bad-exit cancelling the step is a consequence; the exception that failed a rank is the cause.
    (logs / "14.out").write_text("Traceback (most recent call last):\n  File x\nFileNotFoundError: no manifest\n"
                                 "slurmstepd-node1: error: *** STEP 14.0 ON node1 CANCELLED AT 2026-12-04 ***\n")
    assert rank_log_cause(logs, job_id="14") == "14.out: FileNotFoundError: no manifest"
    # The watchdog's stacks count only when written during this start.
    run = tmp_path / "run"
    (run / "stacks").mkdir(parents=True)
    (run / "stacks" / "rank_00001.txt").write_text("Timeout (0:00:08)!\nThread 0x1 (most recent call first):\n")
    assert failover.hang_cause(run, since=time.time() + 60) is None
    cause = failover.hang_cause(run, since=time.time() - 60)
    assert cause.startswith("hang watchdog: no progress for run.hang_timeout_s on 1 rank(s)")
    assert "rank_00001.txt" in cause


def _fake_scontrol(bin_dir: Path, record: Path, start: str, stderr: Path) -> None:
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(f"""#!/bin/sh
echo "$@" >> {record}
if [ "$1" = show ]; then echo "JobId=$3 JobName=x StartTime={start} StdErr={stderr} StdOut={stderr}"; fi
exit 0
""")
    script.chmod(0o755)


def test_the_batch_scripts_failover_command_requeues_with_the_cause_then_gives_up(tmp_path):
    """`python -m phileo.launch.failover --run-dir` as slurm/pretrain.sbatch calls it after a failed srun step:
    the cause from the job's output since its last start, `scontrol requeue` while failures are left, then a
    failed run that is not requeued again."""
    run = _run(tmp_path)
    (run / "logs").mkdir()
    out = run / "logs" / "77.out"
    out.write_text("[2026-12-04] job 77 (restart 0) on node[1-2]: run R\nsrun: error: node1: task 0: Out Of Memory\n"
                   "[2026-12-04] job 77 (restart 1) on node[1-2]: run R\nslurmstepd: error: *** STEP 77.0 ON node1 "
                   "CANCELLED AT 2026-12-04T10:00:00 ***\nsrun: error: node2: task 1: Killed\n")
    calls = tmp_path / "calls.txt"
    _fake_scontrol(tmp_path / "bin", calls, "2026-12-04T10:00:00", out)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "77",
           "PYTHONPATH": str(REPO)}
    env.pop("SLURM_ARRAY_JOB_ID", None)
    cmd = [sys.executable, "-m", "phileo.launch.failover", "--exit-code", "137", "--run-dir", str(run),
           "--max-failures", "1"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 137, first.stderr
    assert "requeue 77" in calls.read_text()
    state = read_state(run)
    assert state["state"] == "requeued" and state["reason"] == "77.out: srun: error: node2: task 1: Killed"
    calls.unlink()
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert "requeue" not in calls.read_text() and "is not retried" in second.stderr
    assert read_state(run)["state"] == "failed"
