"""When a run stops and when it checkpoints: steps, epochs, early stopping, preemption.

    policy = StopPolicy(train.steps, checkpoint.every_steps, train.max_steps_per_launch, train.stop_signals)
    policy.start(start_step)                   # the step this launch resumes after
    policy.set_epoch_steps(n)                 # steps per epoch, for early stopping on the training loss
    decision = policy.after_step(step, stop_requested, stop_early, train_loss)
    if decision.save: ...checkpoint...
    if decision.stop: ...end with decision.status...

`stop_requested` is the StopFlag's value already agreed by all ranks (the Trainer carries it in the step's one
all-reduce), `stop_early` the task's wish, also agreed, and `train_loss` the step's loss averaged over all ranks;
so every rank takes the same decision at the same step. With train.early_stop_patience_epochs > 0 the policy
stops the run when the mean training loss of an epoch has not improved for that many epochs (the published
pretraining's rule).
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
                 stop_signals: list[str] = (), early_stop_patience_epochs: int = 0, early_stop_min_delta: float = 0.0):
        self.total_steps = total_steps
        self.checkpoint_every_steps = checkpoint_every_steps
        self.max_steps_per_launch = max_steps_per_launch
        self.flag = StopFlag(list(stop_signals))
        self.start_step = 0
        self._installed = False
        # Early stopping on the training loss, counted in epochs; the loss sum of the epoch in progress.
        self.train_loss_stop = (EarlyStopping(early_stop_patience_epochs, early_stop_min_delta)
                                if early_stop_patience_epochs > 0 else None)
        self.epoch_steps = 0
        self._epoch_sum, self._epoch_count = 0.0, 0

    @classmethod
    def from_config(cls, cfg: Any) -> "StopPolicy":
        """From a job config's train and checkpoint sections."""
        t = cfg.train
        return cls(t.steps, cfg.checkpoint.every_steps, t.max_steps_per_launch, list(t.stop_signals),
                   getattr(t, "early_stop_patience_epochs", 0), getattr(t, "early_stop_min_delta", 0.0))

    def set_epoch_steps(self, steps: int) -> None:
        """How many optimizer steps make one epoch, for early stopping on the training loss (the same on all
        ranks: the Trainer agrees on it)."""
        self.epoch_steps = max(1, int(steps))

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

    def after_step(self, step: int, stop_requested: bool, stop_early: bool = False,
                   train_loss: float | None = None) -> Decision:
        """The decision after optimizer step `step`: a checkpoint every checkpoint.every_steps, at the last step,
        and before any stop; stop at train.steps, when the task asks or when the training loss stopped improving
        ("completed"), on a stop signal or after train.max_steps_per_launch steps of this launch ("preempted")."""
        if not stop_early and self._train_loss_says_stop(step, train_loss):
            return Decision(True, True, "completed", stopped_early=True,
                            why=f"the epoch's mean training loss has not improved for "
                                f"{self.train_loss_stop.patience} epochs (best {self.train_loss_stop.best:.6g} "
                                f"in epoch {self.train_loss_stop.best_at})")
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

    def _train_loss_says_stop(self, step: int, train_loss: float | None) -> bool:
        if self.train_loss_stop is None or train_loss is None:
            return False
        if self.epoch_steps < 1:
            raise RuntimeError("StopPolicy: early stopping on the training loss needs set_epoch_steps() first")
        self._epoch_sum += float(train_loss)
        self._epoch_count += 1
        if step % self.epoch_steps:
            return False
        mean = self._epoch_sum / self._epoch_count
        self._epoch_sum, self._epoch_count = 0.0, 0
        self.train_loss_stop.update(mean, step // self.epoch_steps)
        return self.train_loss_stop.should_stop

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to go on with early stopping on the training loss exactly."""
        if self.train_loss_stop is None:
            return {}
        return {"train_loss": self.train_loss_stop.state_dict(), "epoch_sum": self._epoch_sum,
                "epoch_count": self._epoch_count, "epoch_steps": self.epoch_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.train_loss_stop is None or not state or "train_loss" not in state:
            return
        self.train_loss_stop.load_state_dict(state["train_loss"])
        self._epoch_sum, self._epoch_count = float(state["epoch_sum"]), int(state["epoch_count"])


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
