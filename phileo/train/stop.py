"""When a run stops and when it checkpoints: steps, epochs, early stopping, preemption.

    policy = StopPolicy(train.steps, checkpoint.every_steps, train.max_steps_per_launch, train.stop_signals)
    policy.start(start_step)                   # the step this launch resumes after
    decision = policy.after_step(step, stop_requested, stop_early)
    if decision.save: ...checkpoint...
    if decision.stop: ...end with decision.status...

`stop_requested` is the StopFlag's value already agreed by all ranks (the Trainer carries it in the step's one
all-reduce), and `stop_early` the task's wish, also agreed; so every rank takes the same decision at the same step.
The engine counts optimizer steps; a protocol that counts epochs converts with steps_per_epoch().
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from phileo.train.signals import StopFlag


def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    """Optimizer steps that see `num_samples` once with `global_batch` samples per step (at least 1)."""
    return max(1, math.ceil(num_samples / global_batch))


@dataclass(frozen=True)
class Decision:
    """What to do after a step: save a checkpoint, and whether to stop (status "completed" or "preempted")."""

    save: bool
    stop: bool = False
    status: str = ""  # "completed" | "preempted" when stop
    stopped_early: bool = False
    why: str = ""


class StopPolicy:
    """The stopping rules of the engine. Owns the StopFlag (flag-only handlers of the stop signals)."""

    def __init__(self, total_steps: int, checkpoint_every_steps: int, max_steps_per_launch: int = 0,
                 stop_signals: list[str] = ()):
        self.total_steps = total_steps
        self.checkpoint_every_steps = checkpoint_every_steps
        self.max_steps_per_launch = max_steps_per_launch
        self.flag = StopFlag(list(stop_signals))
        self.start_step = 0
        self._installed = False

    @classmethod
    def from_config(cls, cfg: Any) -> "StopPolicy":
        """From a job config's train and checkpoint sections."""
        return cls(cfg.train.steps, cfg.checkpoint.every_steps, cfg.train.max_steps_per_launch,
                   list(cfg.train.stop_signals))

    def covered_by(self, done: Mapping[str, Any] | None) -> bool:
        """True when a DONE marker says there is nothing left to train (train.steps reached, or stopped early)."""
        return done is not None and (int(done.get("step", 0)) >= self.total_steps or bool(done.get("stopped_early")))

    def start(self, start_step: int) -> None:
        self.start_step = start_step

    def install(self) -> None:
        """Installs the signal handlers (before the loader forks its workers, so they inherit them); a second
        call keeps the first one's (so restore() gives back the handlers from before the first)."""
        if not self._installed:
            self._installed = self.flag.install()

    def restore(self) -> None:
        self.flag.restore()
        self._installed = False

    def after_step(self, step: int, stop_requested: bool, stop_early: bool = False) -> Decision:
        """The decision after optimizer step `step`: a checkpoint every checkpoint.every_steps, at the last step,
        and before any stop; stop at train.steps or when the task asks ("completed"), on a stop signal or after
        train.max_steps_per_launch steps of this launch ("preempted")."""
        last = step >= self.total_steps
        launch_limit = (self.max_steps_per_launch > 0 and step - self.start_step >= self.max_steps_per_launch
                        and not last)
        save = step % self.checkpoint_every_steps == 0 or last or stop_requested or launch_limit or stop_early
        if stop_early:
            return Decision(save, True, "completed", stopped_early=True, why="stopped early")
        if last:
            return Decision(save, True, "completed")
        if stop_requested or launch_limit:
            why = (f"stop signal {self.flag.signal_name or '(on another rank)'}" if stop_requested
                   else f"train.max_steps_per_launch={self.max_steps_per_launch}")
            return Decision(save, True, "preempted", why=why)
        return Decision(save)


class EarlyStopping:
    """Stop after `patience` (steps, or whatever unit `at` counts in) without a value lower than the best by
    more than `min_delta`. Non-finite values never count as better. Its state goes into checkpoints."""

    def __init__(self, patience: int, min_delta: float = 0.0):
        self.patience, self.min_delta = patience, min_delta
        self.best = math.inf
        self.best_at = 0  # 0: no finite value yet
        self.should_stop = False

    def update(self, value: float, at: int) -> bool:
        """Records `value` measured at `at`; returns True when it is the new best."""
        improved = math.isfinite(value) and value < self.best - self.min_delta
        if improved:
            self.best, self.best_at = value, at
        self.should_stop = at - self.best_at >= self.patience
        return improved

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_at": self.best_at}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best, self.best_at = float(state["best"]), int(state["best_at"])


__all__ = ["StopPolicy", "Decision", "EarlyStopping", "steps_per_epoch"]
