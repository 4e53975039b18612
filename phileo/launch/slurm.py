"""Small, dependable helpers around the SLURM command-line tools.

Why not just `job.result()`: without an accounting database (`sacct`), submitit cannot tell that a job died
before writing its result and `result()` waits forever. Here we ask `squeue` whether any part of the job
(array tasks and requeues included) is still alive, and stop waiting when none is.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

# States in which a job (or one of its array tasks) may still produce a result.
ACTIVE_STATES = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
    "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED",
})


class JobFailedError(RuntimeError):
    """A SLURM job ended without producing the expected result."""


def job_states(job_id: str | int) -> list[str]:
    """States of every part of a job (array tasks, het components) that squeue still lists; [] when none."""
    try:
        out = subprocess.run(["squeue", "-h", "-t", "all", "-j", str(job_id), "-o", "%T"],
                             capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return ["UNKNOWN"]  # controller busy: assume alive and ask again later
    if out.returncode != 0:
        # "Invalid job id specified": the record was purged, so nothing of it runs any more.
        return []
    return [s.strip() for s in out.stdout.split() if s.strip()]


def job_active(job_id: str | int) -> bool:
    """True while any part of the job may still run (pending, running, requeued, completing ...)."""
    return any(s in ACTIVE_STATES or s == "UNKNOWN" for s in job_states(job_id))


def scancel(job_id: str | int) -> None:
    subprocess.run(["scancel", str(job_id)], capture_output=True, timeout=30)


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"(no file {path})"


def _submitit_jobs(job: Any) -> list[Any]:
    return list(job._sub_jobs) if getattr(job, "_sub_jobs", None) else [job]


def wait_for_submitit_job(job: Any, timeout_s: float, poll_s: float = 1.0, grace_s: float = 5.0) -> list[Any]:
    """Waits for a submitit job (all its tasks, requeues included) and returns `job.results()`.

    Raises TimeoutError (after cancelling the job) when it is still alive after `timeout_s`, and JobFailedError
    with the end of its stderr when SLURM no longer lists it but some task left no result. Never hangs.
    """
    parts = _submitit_jobs(job)
    deadline = time.monotonic() + timeout_s
    gone_since: float | None = None
    while True:
        if all(p.paths.result_pickle.exists() for p in parts):
            return job.results()
        if job_active(job.job_id):
            gone_since = None
        else:
            # The result pickle is written just before the task exits; allow for file-system lag.
            gone_since = gone_since or time.monotonic()
            if time.monotonic() - gone_since > grace_s:
                missing = [p for p in parts if not p.paths.result_pickle.exists()]
                err = "\n".join(f"--- {p.paths.stderr} ---\n{_tail(p.paths.stderr)}" for p in missing)
                raise JobFailedError(f"SLURM job {job.job_id} ended but {len(missing)} task(s) wrote no result.\n{err}")
        if time.monotonic() > deadline:
            scancel(job.job_id)
            err = "\n".join(f"--- {p.paths.stderr} ---\n{_tail(p.paths.stderr)}" for p in parts)
            raise TimeoutError(f"SLURM job {job.job_id} still running after {timeout_s:.0f} s; cancelled it.\n{err}")
        time.sleep(poll_s)


def wait_for_job_id(job_id: str | int, timeout_s: float | None = None, poll_s: float = 2.0) -> None:
    """Blocks until SLURM lists no active part of `job_id` (requeues included). TimeoutError after timeout_s."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while job_active(job_id):
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"SLURM job {job_id} still active after {timeout_s:.0f} s")
        time.sleep(poll_s)


def sbatch(script: str | os.PathLike, args: Iterable[str] = (), env: dict[str, str] | None = None) -> str:
    """Submits a batch script with `sbatch --parsable`; returns the job id. Raises with sbatch's message."""
    cmd = ["sbatch", "--parsable", *args, str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"sbatch refused {script}: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout.strip().split(";")[0]


def scontrol_config_value(key: str, default: str | None = None) -> str | None:
    """A value from `scontrol show config` (e.g. MaxArraySize); `default` when SLURM does not answer."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return default
    for line in out.stdout.splitlines():
        k, _, v = line.partition("=")
        if k.strip() == key:
            return v.strip()
    return default
