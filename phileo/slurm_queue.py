"""What SLURM's queue says about some jobs, in one squeue call: the shared layer's view of the scheduler.

Used by the status command, results collection and sweep re-submission (phileo.bench sits below phileo.launch,
so this lives here, with no import from either). `sacct` is asked only for jobs squeue no longer lists, and may
fail (no accounting database, as on the dev cluster): callers then fall back on the run folder.

    states = queue_states(["1234", "1240"])   # {"1234": QueueEntry(...), "1240_3": QueueEntry(...), ...}
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from typing import Iterable, Optional

# States in which a job (or one array task) may still run or run again.
ACTIVE = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                    "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED"})
PENDING = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING"})


@dataclass(frozen=True)
class QueueEntry:
    """One job or array task as squeue (or sacct) lists it. time_left_s: None when unknown or unlimited."""

    job_id: str          # "1234", or "1234_7" for array task 7
    state: str           # SLURM's word: PENDING, RUNNING, COMPLETED, FAILED ...
    reason: str = ""
    time_left_s: Optional[int] = None
    restarts: int = 0

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def pending(self) -> bool:
        return self.state in PENDING


def have_squeue() -> bool:
    return shutil.which("squeue") is not None


def parse_duration_s(text: str) -> Optional[int]:
    """SLURM durations ('1-02:03:04', '02:03:04', '03:04', '45') in seconds; None for UNLIMITED / INVALID / ''."""
    text = text.strip()
    if not text or not text[0].isdigit():
        return None
    days, _, hms = text.rpartition("-")
    seconds = 0
    try:
        for part in hms.split(":"):
            seconds = seconds * 60 + int(part)
        return seconds + int(days or 0) * 86400
    except ValueError:
        return None


def _run(cmd: list[str], timeout_s: float) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def _squeue(ids: list[str], timeout_s: float) -> Optional[dict[str, QueueEntry]]:
    # -r: one line per array task, so pending tasks "123_[4-9%2]" come as 123_4 ... 123_9.
    text = _run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T|%L|%r|%R"], timeout_s)
    if text is None:
        return None
    found: dict[str, QueueEntry] = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) >= 4:
            found[parts[0].strip()] = QueueEntry(parts[0].strip(), parts[1].strip(), parts[3].strip(),
                                                 parse_duration_s(parts[2]))
    return found


def _sacct(ids: list[str], timeout_s: float) -> dict[str, QueueEntry]:
    """Finished jobs from the accounting database; {} when there is none (sacct fails) or it does not answer."""
    if not ids or shutil.which("sacct") is None:
        return {}
    text = _run(["sacct", "-n", "-P", "-X", "-j", ",".join(ids), "-o", "JobID,State"], timeout_s)
    found: dict[str, QueueEntry] = {}
    for line in (text or "").splitlines():
        job, _, state = line.partition("|")
        if job.strip():
            # "CANCELLED by 0" -> CANCELLED
            found[job.strip()] = QueueEntry(job.strip(), state.split()[0] if state.split() else "UNKNOWN")
    return found


def queue_states(job_ids: Iterable[str], timeout_s: float = 20) -> Optional[dict[str, QueueEntry]]:
    """The queue entries of `job_ids` (whole jobs or array jobs; array tasks come one per entry), then sacct's
    answer for ids squeue no longer lists. None when squeue is absent or does not answer (state unknown: never
    read as "not running")."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids or not have_squeue():
        return None if not have_squeue() else {}
    found = _squeue(ids, timeout_s)
    if found is None:
        # squeue refuses the whole list when one id was purged from its memory: ask one by one.
        found = {}
        for job in ids:
            one = _squeue([job], timeout_s)
            if one is None and _run(["squeue", "-h", "-o", "%i"], timeout_s) is None:
                return None  # the controller does not answer at all
            found.update(one or {})
    listed = {k.split("_", 1)[0] for k in found} | set(found)
    found.update({k: v for k, v in _sacct([j for j in ids if j not in listed], timeout_s).items() if k not in found})
    return found


__all__ = ["QueueEntry", "ACTIVE", "PENDING", "have_squeue", "parse_duration_s", "queue_states"]
