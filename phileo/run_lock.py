"""One writer per run: RUN/run.lock says which job (or local process) is training into the folder.

    {"job_id": "1234" | null, "host": "lrdn0001", "node": "lrdn0001" | null, "pid": 4242, "time": "..."}

Global rank 0 of a training job takes the lock before it writes anything into the run folder and removes it
when the job ends; the launchers check it before submitting (`lock_problem`). A lock is held by a live owner
when its SLURM job is still known to the scheduler in a state that can run again (pending, running, requeued,
suspended ...) or, without a job id, when its process still runs on this host. Otherwise it is stale (a job that
was killed, a node that crashed) and the next start takes it over, saying so in the log. A requeued job has the
same SLURM job id as the one that wrote the lock, and takes its own lock over.

The lock is a file created with O_EXCL, not fcntl/flock: those are not reliable across nodes on Lustre or NFS
mounted without flock, while an exclusive create is atomic on every POSIX shared file system.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
from pathlib import Path
from typing import Any, Optional

from phileo.fsutil import atomic_write_json
from phileo.run_state import now_iso, slurm_job_id

LOCK_FILE = "run.lock"
log = logging.getLogger("phileo.train")

# squeue states after which a job never runs again: its lock is stale.
_ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
          "PREEMPTED", "TIMEOUT"}


class RunLocked(RuntimeError):
    """Another live job or process holds the run folder's lock."""

    retryable = False  # a second writer is refused, not retried (phileo.launch.failover)


def this_owner() -> dict[str, Any]:
    """The lock record of this process: SLURM job id (the array task's "123_4" when in an array), host, SLURM
    node name (several slurmd on one host share a hostname), pid, time."""
    return {"job_id": slurm_job_id(), "host": socket.gethostname(), "node": os.environ.get("SLURMD_NODENAME"),
            "pid": os.getpid(), "time": now_iso()}


def read_lock(run_dir: str | os.PathLike) -> Optional[dict[str, Any]]:
    """The lock record, None when there is none; an unreadable one (a writer killed mid-write) reads as {}."""
    try:
        record = json.loads((Path(run_dir) / LOCK_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def describe(owner: dict[str, Any]) -> str:
    where = owner.get("node") or owner.get("host") or "an unknown host"
    what = f"SLURM job {owner['job_id']}" if owner.get("job_id") else f"process {owner.get('pid')}"
    return f"{what} on {where} (since {owner.get('time', '?')})"


def _slurm_job_state(job_id: str) -> Optional[str]:
    """squeue's state of the job, "" when squeue does not know it (long ended), None when squeue cannot be asked."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return "" if "Invalid job id" in (out.stderr or "") else None
    return out.stdout.strip().splitlines()[0].strip() if out.stdout.strip() else ""


def _process_alive(pid: int) -> bool:
    """The process exists and is not a zombie (kill -0 succeeds on a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] != "Z"
    except (OSError, IndexError):
        return True


def holder_status(owner: dict[str, Any], me: Optional[dict[str, Any]] = None) -> str:
    """"ours" (the same SLURM job: a requeue, or this very process), "live", "stale", or "unknown" (a SLURM
    holder and no squeue here to ask)."""
    me = me or this_owner()
    job_id = owner.get("job_id")
    if job_id:
        if job_id == me.get("job_id"):
            return "ours"
        state = _slurm_job_state(job_id)
        if state is None:
            return "unknown"
        return "stale" if state == "" or state.split()[0] in _ENDED else "live"
    if not owner:
        return "stale"
    if owner.get("host") != me["host"]:
        return "unknown"  # a local process on another machine: cannot be checked from here
    if owner.get("pid") == me["pid"]:
        return "ours"
    return "live" if isinstance(owner.get("pid"), int) and _process_alive(owner["pid"]) else "stale"


def lock_problem(run_dir: str | os.PathLike) -> Optional[str]:
    """For the launchers, before submitting: why a new job may not train into `run_dir` (None: it may)."""
    owner = read_lock(run_dir)
    if owner is None:
        return None
    status = holder_status(owner, {**this_owner(), "job_id": None})
    if status in ("live", "unknown"):
        extra = "" if status == "live" else " (it cannot be checked from here)"
        return (f"run folder {run_dir} is in use by {describe(owner)}{extra}: wait for it to end or cancel it "
                f"(scancel); if it is certainly gone, delete {Path(run_dir) / LOCK_FILE}")
    return None


def acquire(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Takes the run's lock for this process (global rank 0 of the job). Takes over its own job's lock (a requeue)
    and a stale one (logged). Refuses (RunLocked, naming the job and host that hold it) a live holder. Returns the
    record written."""
    path = Path(run_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    me = this_owner()
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
    except FileExistsError:
        owner = read_lock(run_dir) or {}
        status = holder_status(owner, me)
        if status in ("live", "unknown"):
            raise RunLocked(f"run folder {run_dir} is in use by {describe(owner)}: a second writer would "
                            f"corrupt it; wait for that job to end or cancel it. If it is certainly gone, delete "
                            f"{path}") from None
        if status == "stale":
            log.warning("taking over the stale lock of %s in %s (it is no longer running)", describe(owner), run_dir)
        atomic_write_json(path, me)
        return me
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(me, indent=2) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return me


def release(run_dir: str | os.PathLike) -> None:
    """Removes the lock if this process holds it (a lock another process took over stays)."""
    owner = read_lock(run_dir)
    if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        (Path(run_dir) / LOCK_FILE).unlink(missing_ok=True)


__all__ = ["LOCK_FILE", "RunLocked", "acquire", "release", "read_lock", "lock_problem", "holder_status",
           "this_owner", "describe"]
