"""The hang watchdog: a rank that makes no progress for run.hang_timeout_s writes its Python stacks and exits.

A hang on a cluster is a rank that was stopped (SIGSTOP, a frozen node, a file system that blocks) or a collective
that never completes because a peer is gone or stuck. Either way the live ranks sit in a collective until the
process-group timeout (train.dist_timeout_s, 900 s) or NCCL's watchdog (600 s). This watchdog is faulthandler's
own timer (`dump_traceback_later`, a C thread that needs no GIL, so it fires even while the main thread is stuck
in C code): it is re-armed at every step; if it expires, every thread's stack is written to
RUN/stacks/rank_<global rank>.txt and the process exits with status 1, so srun --kill-on-bad-exit ends the
other ranks and the batch script's failure handling requeues the job (phileo.launch.failover). A stopped rank
cannot write its own stack; the ranks waiting for it write theirs, which show the collective they wait in.
"""

from __future__ import annotations

import faulthandler
import os
from pathlib import Path
from typing import IO, Optional

STACKS_DIR = "stacks"
# faulthandler has one timer per process, so one watchdog is active at a time; code that makes progress inside a
# long step of its own (an evaluation over a large test set) re-arms it through heartbeat().
_active: Optional["HangWatchdog"] = None


def heartbeat() -> None:
    """Progress was made (a batch evaluated): re-arms the active watchdog, if any. Cheap: one C call."""
    if _active is not None:
        _active.beat()


def timeout_note(hang_timeout_s: float, dist_timeout_s: float) -> str | None:
    """A warning when the watchdog cannot be the one that ends a hung collective (None when it can): with a
    process-group timeout no longer than run.hang_timeout_s the collective raises first, so the job still ends
    and is retried, but without the stacks that say where it hung."""
    if 0 < dist_timeout_s <= hang_timeout_s:
        return (f"run.hang_timeout_s={hang_timeout_s:g} is not shorter than train.dist_timeout_s={dist_timeout_s:g}: "
                f"a hung collective will end in the process-group timeout (an exception; the job is still "
                f"retried) before the hang watchdog can write every rank's stacks; lower run.hang_timeout_s")
    return None


def stacks_path(run_dir: str | os.PathLike, global_rank: int) -> Path:
    return Path(run_dir) / STACKS_DIR / f"rank_{global_rank:05d}.txt"


class HangWatchdog:
    """Arms faulthandler's timer for `timeout_s` (0 = off); `beat()` re-arms it, `stop()` disarms it and removes
    an empty stacks file. Use as a context manager around the training loop."""

    def __init__(self, run_dir: str | os.PathLike, global_rank: int, timeout_s: float):
        self.path = stacks_path(run_dir, global_rank)
        self.timeout_s = float(timeout_s)
        self._file: Optional[IO[str]] = None

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def start(self) -> "HangWatchdog":
        global _active
        if self.enabled and self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Opened now: when the timer fires there may be no chance to open a file (a blocked file system).
            self._file = open(self.path, "a")
            _active = self
            self.beat()
        return self

    def beat(self) -> None:
        """Progress was made: the next timeout_s starts now."""
        if self._file is not None:
            faulthandler.cancel_dump_traceback_later()
            faulthandler.dump_traceback_later(self.timeout_s, repeat=False, file=self._file, exit=True)

    def stop(self) -> None:
        global _active
        if self._file is None:
            return
        if _active is self:
            _active = None
        faulthandler.cancel_dump_traceback_later()
        self._file.close()
        self._file = None
        try:
            if self.path.stat().st_size == 0:
                self.path.unlink()
                self.path.parent.rmdir()  # only when no other rank left stacks there
        except OSError:
            pass

    def __enter__(self) -> "HangWatchdog":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["HangWatchdog", "heartbeat", "stacks_path", "timeout_note", "STACKS_DIR"]
