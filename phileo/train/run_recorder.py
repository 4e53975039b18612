"""The engine's writes to state.json (phileo.run_state): start, progress, checkpoints and the end of a launch.

One small component so the Trainer's hooks are one line each, on global rank 0 only. A failed write is logged and
never ends training: state.json is for people watching, the checkpoints are the truth.

What it keeps besides the state: `compute_s` (seconds of this run's launches so far, so the status command can
say node-hours and GPU-hours), the layout (`num_nodes`, `world_size`, `device`), and `requeues` at least as high
as SLURM_RESTART_COUNT (a requeue that nobody recorded, e.g. by finetune_array.sh, still counts).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from phileo.run_state import now_iso, one_line, read_state, record_final, slurm_job_id, update_state

log = logging.getLogger("phileo.train")

PROGRESS_EVERY_S = 15.0  # state.json is rewritten at most this often between checkpoints (metrics.jsonl has every step)


class RunStateRecorder:
    """state.json of `run_dir`, written by global rank 0 (`enabled`)."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._t0 = time.monotonic()
        self._compute_before = 0.0
        self._last_write = 0.0

    def _write(self, state: str | None = None, event: str | None = None, detail: str | None = None,
               **fields: Any) -> None:
        if not self.enabled:
            return
        try:
            update_state(self.run_dir, state, event=event, detail=detail,
                         compute_s=round(self._compute_before + time.monotonic() - self._t0, 1), **fields)
            self._last_write = time.monotonic()
        except (OSError, ValueError) as e:
            log.warning("could not update %s: %s", self.run_dir / "state.json", e)

    def started(self, step: int, total_steps: int, info: Any) -> None:
        """The launch trains from `step` (0, or the resumed checkpoint's step)."""
        if not self.enabled:
            return
        try:
            previous = read_state(self.run_dir) or {}
        except ValueError:
            previous = {}
        self._compute_before = float(previous.get("compute_s") or 0.0)
        self._t0 = time.monotonic()
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        self._write("running", event="started", detail=f"from step {step}", step=step, total_steps=total_steps,
                    job_id=slurm_job_id() or previous.get("job_id"), num_nodes=info.num_nodes,
                    world_size=info.world_size, device=str(info.device).split(":")[0],
                    requeues=max(int(previous.get("requeues") or 0), restarts), reason=None)

    def progress(self, step: int) -> None:
        if self.enabled and time.monotonic() - self._last_write >= PROGRESS_EVERY_S:
            self._write(step=step)

    def checkpoint(self, step: int, path: Path) -> None:
        try:
            rel = str(Path(path).relative_to(self.run_dir))
        except ValueError:
            rel = str(path)
        # A new checkpoint is progress: --max-failures counts failures in a row since the last one.
        self._write(step=step, last_checkpoint={"step": step, "path": rel, "time": now_iso()}, failures=0)

    def ended(self, status: str, step: int, final_loss: float | None, reason: str = "") -> None:
        """completed | preempted | failed (the engine's own endings; the job layer may then say "requeued")."""
        self._write(status, event=status, detail=reason or None, step=step, final_loss=final_loss,
                    reason=reason or None)

    def final_failure(self, error: BaseException) -> None:
        """An exception that a retry cannot help (phileo.run_state.is_retryable) ends the run: recorded as final,
        so that the batch script's failover does not requeue it, whichever script runs the job."""
        if not self.enabled:
            return
        try:
            record_final(self.run_dir, one_line(error))
        except (OSError, ValueError) as e:
            log.warning("could not update %s: %s", self.run_dir / "state.json", e)


__all__ = ["RunStateRecorder", "PROGRESS_EVERY_S"]
