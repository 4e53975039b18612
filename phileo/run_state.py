"""state.json: what a run is doing now, in one small file that a status command can read on a login node.

A run folder's heavy files (checkpoints, TensorBoard events) are never needed to answer "is it running, how far
is it, when did it last save, how often was it requeued or did it fail": the launcher and the training job keep
this file up to date instead. It is written atomically (temporary name + rename), by one writer at a time (the
launcher before the job exists, then global rank 0 of the job), and read by anyone.

    {
      "state": "pending" | "running" | "requeued" | "completed" | "failed" | "preempted" | "stopped",
      "updated": "2026-12-03T14:00:00+00:00",     # UTC, ISO 8601
      "job_id": "1234" | null,                     # the SLURM job (array jobs: "1234_7"), or null locally
      "host": "lrdn0001", "pid": 4242,             # where the writer runs
      "step": 1200, "total_steps": 100000,
      "last_checkpoint": {"step": 1000, "path": "checkpoints/step_00001000", "time": "..."} | null,
      "requeues": 2, "failures": 0, "max_failures": 3,  # failures: in a row, since the last checkpoint
      "final": false,                              # a failure the job recorded as not worth a retry
      "reason": null | "one line: why it ended (the error, 'walltime', 'max_failures reached' ...)",
      "started": "...",                            # first start of the run
      "events": [{"time", "event", "job_id", "detail"}, ...]   # the last EVENTS_KEPT transitions
    }

States: pending (submitted, not started), running, requeued (stopped at the walltime signal or after a failure,
back in the queue), completed (train.steps reached or an early stop), failed (an error; no retry left),
preempted (stopped at the signal without a requeue left: continue with --resume), stopped (stopped by a user).
`TERMINAL_STATES` never change again unless a new launch (--resume) starts the run anew.
"""

from __future__ import annotations

import datetime as _dt
import os
import socket
from pathlib import Path
from typing import Any

from phileo.fsutil import atomic_write_json, read_json

STATE_FILE = "state.json"
STATES = ("pending", "running", "requeued", "completed", "failed", "preempted", "stopped")
TERMINAL_STATES = ("completed", "failed", "preempted", "stopped")
EVENTS_KEPT = 50


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def slurm_job_id() -> str | None:
    """This job's id as squeue names it: "1234_7" for array task 7, "1234" otherwise; None outside SLURM."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def read_state(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's state.json, or None when the run has none yet (an older run, or nothing launched).
    A state file that cannot be parsed is reported as such (ValueError naming the file), never guessed."""
    path = Path(run_dir) / STATE_FILE
    if not path.exists():
        return None
    state = read_json(path, "run state")
    if not isinstance(state, dict) or state.get("state") not in STATES:
        raise ValueError(f"{path} is not a run state file (no valid 'state'); delete it: the next start rewrites it")
    return state


def update_state(run_dir: str | os.PathLike, state: str | None = None, event: str | None = None,
                 detail: str | None = None, **fields: Any) -> dict[str, Any]:
    """Read-modify-write of state.json (atomic): sets `state` and `fields`, stamps `updated`, host and pid, and
    appends an event when `event` is given (the last EVENTS_KEPT are kept). Only one process of a run may
    call this at a time (the launcher before submission, then global rank 0). Returns the new state."""
    if state is not None and state not in STATES:
        raise ValueError(f"unknown run state {state!r}; one of {', '.join(STATES)}")
    run_dir = Path(run_dir)
    current = read_state(run_dir) or {"state": "pending", "started": None, "requeues": 0, "failures": 0,
                                      "last_checkpoint": None, "reason": None, "events": []}
    current.update(fields)
    if state is not None:
        current["state"] = state
    stamp = now_iso()
    if state == "running" and not current.get("started"):
        current["started"] = stamp
    current.update(updated=stamp, host=socket.gethostname(), pid=os.getpid())
    if event:
        events = list(current.get("events") or [])
        events.append({"time": stamp, "event": event, "job_id": current.get("job_id"), "detail": detail})
        current["events"] = events[-EVENTS_KEPT:]
    atomic_write_json(run_dir / STATE_FILE, current)
    return current


def is_retryable(error: BaseException) -> bool:
    """Whether running the job again from its last checkpoint can help: False when the exception says
    `retryable = False` (its class or the instance: phileo.config.ConfigError, phileo.run_lock.RunLocked,
    phileo.data.chunk_format.BadChunkError for a corrupt chunk), True for anything else."""
    return bool(getattr(error, "retryable", True))


def one_line(error: BaseException) -> str:
    """`Type: message` on one line, at most 300 characters (state.json's `reason`)."""
    return (f"{type(error).__name__}: {error}".splitlines() or ["?"])[0][:300]


def record_final(run_dir: str | os.PathLike, reason: str) -> dict[str, Any]:
    """A failure that running the job again cannot help, recorded by the job itself (global rank 0): state
    "failed" with `final` set, which the batch script's failover reads (phileo.launch.failover) and does not
    retry. A second record of the same start changes nothing."""
    current = read_state(run_dir) or {}
    if current.get("state") == "failed" and current.get("final") and failed_since_start(current):
        return current
    return update_state(run_dir, "failed", event="failed", detail=reason, reason=reason, final=True)


def failed_since_start(state: dict[str, Any]) -> bool:
    """state.json's last "failed" event comes after the run's last start ("lock" or "started" event)."""
    events = state.get("events") or []
    last_failed = max((i for i, e in enumerate(events) if e.get("event") == "failed"), default=-1)
    last_start = max((i for i, e in enumerate(events) if e.get("event") in ("lock", "started")), default=-1)
    return last_failed > last_start


def record_pending(run_dir: str | os.PathLike, total_steps: int | None = None) -> dict[str, Any]:
    """The launcher's write just before a submission: the run is queued (a new launch: an earlier end state,
    reason and failure count no longer hold). Written before, not after, so that it never overwrites a job that
    starts at once."""
    fields: dict[str, Any] = {"reason": None, "job_id": None, "failures": 0, "final": False}
    if total_steps is not None:
        fields["total_steps"] = int(total_steps)
    return update_state(run_dir, "pending", event="submitted", **fields)


def record_job_id(run_dir: str | os.PathLike, job_id: str) -> None:
    """The launcher's write after the submission: the job id, unless the job has already started and said so."""
    current = read_state(run_dir)
    if current is not None and current.get("state") == "pending" and not current.get("job_id"):
        update_state(run_dir, job_id=str(job_id))


__all__ = ["STATE_FILE", "STATES", "TERMINAL_STATES", "slurm_job_id", "read_state", "update_state", "record_pending",
           "record_job_id", "record_final", "failed_since_start", "is_retryable", "one_line", "now_iso"]
