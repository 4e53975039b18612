"""Flag-only handlers for the pre-timeout signals.

SLURM sends USR2 some seconds before the time limit (submitit asks for `--signal=USR2@90`) and TERM at the limit,
on scancel and on preemption. A handler that checkpoints inside the signal handler (submitit's default) runs on
whichever rank got the signal, in the middle of whatever it was doing: under ZeRO every rank must take part in a
save, so a one-rank save cannot work. Here the handler only sets a flag; the training loop reads it at the next
step boundary, all ranks agree on it with one all-reduce, and they save together.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Callable

log = logging.getLogger("phileo.train")

Handler = Callable[[int, FrameType | None], object] | int | None


class StopFlag:
    """Installs flag-only handlers for `signal_names` (e.g. ["SIGUSR2", "SIGTERM"]) and restores the previous
    handlers on restore(). `requested` turns true when one arrives; `signal_name` says which."""

    def __init__(self, signal_names: list[str]):
        self.signals = [signal.Signals[n] for n in signal_names]
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[signal.Signals, Handler] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag and a note: no I/O, no locks, nothing that could deadlock with the interrupted code.
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def install(self) -> bool:
        """Replaces the handlers (submitit's included). Only possible in the main thread; elsewhere it logs a
        warning and returns False (the run then stops only at its end or when killed)."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: stop signals (%s) are not handled by this run",
                        ", ".join(s.name for s in self.signals))
            return False
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return True

    def restore(self) -> None:
        """Puts the previous handlers back (so a submitit wrapper sees its own again after training)."""
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous.clear()

    def request(self, reason: str = "request") -> None:
        """Asks for a stop without a signal (tests, callbacks)."""
        self.requested = True
        self.signal_name = reason


def ignore_signals(signal_names: list[str]) -> None:
    """Makes this process ignore `signal_names`: for DataLoader workers, which get the job's signals too (SLURM
    signals every process of the step) and would otherwise die on USR2's default action."""
    for n in signal_names:
        signal.signal(getattr(signal, n), signal.SIG_IGN)


__all__ = ["StopFlag", "ignore_signals"]
