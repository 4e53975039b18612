"""Campaign-grade fault tolerance (issue 14) without a cluster: one writer per run (run.lock), the hang
watchdog on a real 2-rank gloo job, and the checks a launcher makes before submitting.
Checkpoint manifests, skip-bad-newest, retention and ENOSPC are in test_train_components.py."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phileo import run_lock
from phileo.launch.preflight import check_run_dir
from phileo.train.engine import Trainer
from phileo.train.metrics import read_metrics

from test_engine import ToyTask, _spawn_ranks, toy_config


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def _write_lock(run: Path, **owner) -> None:
    run.mkdir(parents=True, exist_ok=True)
    record = {"job_id": None, "host": socket.gethostname(), "node": None, "pid": 1, "time": "t", **owner}
    (run / run_lock.LOCK_FILE).write_text(json.dumps(record))


# ------------------------------------------------------------------------------------------- run.lock
def test_a_live_holder_is_refused_by_name_and_a_dead_one_is_taken_over(tmp_path, caplog):
    run = tmp_path / "run"
    other = _sleeper()
    try:
        _write_lock(run, pid=other.pid)
        with pytest.raises(run_lock.RunLocked, match=f"in use by process {other.pid} on {socket.gethostname()}"):
            run_lock.acquire(run)
        problem = run_lock.lock_problem(run)
        assert problem and f"process {other.pid}" in problem and "run.lock" in problem
    finally:
        other.kill()
        other.wait()
    assert run_lock.lock_problem(run) is None  # dead now: a launch may go ahead
    with caplog.at_level(logging.WARNING, logger="phileo.train"):
        mine = run_lock.acquire(run)
    assert "taking over the stale lock of process" in caplog.text
    assert run_lock.read_lock(run)["pid"] == os.getpid() == mine["pid"]
    run_lock.release(run)
    assert run_lock.read_lock(run) is None


def test_the_requeued_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _write_lock(run, job_id="4242", pid=999999, host="another-node")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the same job after scontrol requeue
    assert run_lock.acquire(run)["job_id"] == "4242"
    # Another SLURM job whose state cannot be asked here (no squeue, or a login node without it) is refused.
    _write_lock(run, job_id="777", pid=1, host="another-node")
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm"))
    with pytest.raises(run_lock.RunLocked, match="in use by SLURM job 777 on another-node"):
        run_lock.acquire(run)


def test_a_second_trainer_into_a_live_run_is_refused_before_writing_anything(tmp_path):
    run = tmp_path / "run"
    other = _sleeper()
    try:
        _write_lock(run, pid=other.pid)
        with pytest.raises(run_lock.RunLocked, match="a second writer would corrupt it"):
            Trainer(toy_config(run), ToyTask()).fit()
        assert sorted(p.name for p in run.iterdir()) == ["run.lock"]  # no log.txt, config, checkpoints
        # The launchers refuse at submission too (check_run_dir backs every launcher's preflight).
        assert any(f"in use by process {other.pid}" in p for p in check_run_dir(run, fresh=False))
    finally:
        other.kill()
        other.wait()
    result = Trainer(toy_config(run, "train.steps=2"), ToyTask()).fit()  # the holder is gone: taken over
    assert result.status == "completed" and not (run / run_lock.LOCK_FILE).exists()  # released at the end
    state = json.loads((run / "state.json").read_text())
    events = [e["event"] for e in state["events"]]
    assert state["lock"]["pid"] == os.getpid() and "lock" in events and events[-1] == "completed"


# ---------------------------------------------------------------------------------------- hang watchdog
def test_a_watchdog_slower_than_the_process_group_timeout_is_warned_about():
    from phileo.train.watchdog import timeout_note

    note = timeout_note(900, 900)
    assert note and "run.hang_timeout_s=900 is not shorter than train.dist_timeout_s=900" in note
    assert timeout_note(480, 900) is None and timeout_note(0, 10) is None  # 0: no watchdog


class SlowTask(ToyTask):
    """Each step sleeps, so a test can stop a rank mid-run."""

    def forward(self, model, batch, ctx):
        time.sleep(0.3)
        return super().forward(model, batch, ctx)


def _hang_worker_main() -> None:
    cfg = toy_config(Path(sys.argv[1]), "train.steps=400", "train.dist_timeout_s=300", "run.hang_timeout_s=8",
                     "checkpoint.every_steps=1000")
    Trainer(cfg, SlowTask()).fit()


@pytest.mark.slow
def test_a_stopped_rank_ends_the_job_within_hang_timeout_with_stacks_written(tmp_path):
    """SIGSTOP rank 1 of a 2-rank gloo job: rank 0's watchdog (run.hang_timeout_s=8) writes its stacks and
    exits 1 within 8 s + 20 s margin (the process-group timeout here is 300 s)."""
    from phileo.train.dist import free_port

    run = tmp_path / "run"
    procs = _spawn_ranks(["-c", "import test_fault_tolerance as t; t._hang_worker_main()", str(run)], 2,
                         free_port())
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").exists() or len(read_metrics(run)) < 3:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the job did not start"
            time.sleep(0.5)
        os.kill(procs[1].pid, signal.SIGSTOP)
        t0 = time.monotonic()
        procs[0].wait(timeout=8 + 20)
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    # The timer runs from the last finished step, just before the stop.
    assert procs[0].returncode == 1 and 6 <= elapsed < 28, (procs[0].returncode, elapsed)
    stacks = (run / "stacks" / "rank_00000.txt").read_text()
    assert "Timeout (0:00:08)!" in stacks and "_train_step" in stacks  # stuck in the step (its collectives)


# ------------------------------------------------------------------------------- the launcher's diagnosis
def test_a_job_without_a_result_is_explained_from_the_whole_rank_logs(tmp_path):
    from phileo.launch.submit import rank_log_cause

    logs = tmp_path / "logs"
    logs.mkdir()
    filler = "step line\n" * 2000  # far past 4 KiB: the cause is near the start, not in a tail
    (logs / "12_0_log.err").write_text("Traceback (most recent call last):\n  File x\n"
                                       "OSError: [Errno 28] No space left on device writing checkpoint /r/c "
                                       "(0 B free of 1.0 MiB under /r)\n" + filler)
    (logs / "12_1_log.err").write_text(filler + "Traceback (most recent call last):\n  File y\nValueError: z\n")
    cause = rank_log_cause(logs)
    assert cause.startswith("12_0_log.err: OSError: [Errno 28] No space left on device writing checkpoint /r/c")
    (logs / "12_0_log.err").unlink()
    assert rank_log_cause(logs) == "12_1_log.err: ValueError: z"
    (logs / "12_1_log.err").write_text(filler)
    assert rank_log_cause(logs) is None


# ------------------------------------------------------------------------------------ converter workers
_POOL_PARENT = """
import multiprocessing as mp, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from phileo.data import convert
ctx = mp.get_context("spawn")
pool = ProcessPoolExecutor(max_workers=2, mp_context=ctx, initializer=convert._worker_init,
                           initargs=(ctx.Queue(), os.getpid()))
futures = [pool.submit(time.sleep, 300) for _ in range(2)]
time.sleep(3)
print(" ".join(str(p) for p in pool._processes), flush=True)
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_converter_workers_exit_when_their_parent_is_killed():
    """The converter's own pool set-up (spawn, convert._worker_init): kill -9 the parent, the workers go."""
    repo = Path(__file__).resolve().parents[1]
    parent = subprocess.Popen([sys.executable, "-c", _POOL_PARENT], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(repo)})
    workers = [int(p) for p in parent.stdout.readline().split()]
    assert len(workers) == 2 and all(_alive(p) for p in workers)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in workers), "converter workers outlived their parent"


@pytest.mark.parametrize("beats", [True, False], ids=["heartbeats", "silent"])
def test_progress_inside_a_long_evaluation_re_arms_the_watchdog(tmp_path, beats):
    """An evaluation longer than run.hang_timeout_s is progress, not a hang: the Evaluator's heartbeat() per
    batch keeps the watchdog quiet; the same wait without heartbeats is ended with the stacks written."""
    code = (f"import time\nfrom phileo.train.watchdog import HangWatchdog, heartbeat\n"
            f"with HangWatchdog({str(tmp_path)!r}, 0, 1.0):\n"
            f"    for _ in range(8):\n        time.sleep(0.3)\n        {'heartbeat()' if beats else 'pass'}\n"
            f"print('finished')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    stacks = tmp_path / "stacks" / "rank_00000.txt"
    if beats:
        assert out.returncode == 0 and "finished" in out.stdout and not stacks.exists()
    else:
        assert out.returncode == 1 and "finished" not in out.stdout
        assert 'File "<string>"' in stacks.read_text()  # the main thread's stack, where it waited
