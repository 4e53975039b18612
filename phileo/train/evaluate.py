"""Evaluation loops: a model over a validation or test set on every rank, each rank on its own share.

The Trainer builds one Evaluator for the model it trains and hands it to the task's evaluate() (every
train.eval_every_steps) and test() (once, after the last step). A task says *what* to measure (a loss summed over
pixels, a metric object); the Evaluator owns *how*: this rank's share of the set (items rank, rank + world, ...,
no padding, so sums are exact), eval mode and no_grad, the precision of training, sums all-reduced over ranks so
every rank gets the same number, and, for the long test pass, a stop vote between batches.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from phileo.train import dist
from phileo.train.loader import _WorkerInit, to_device
from phileo.train.precision import autocast
from phileo.train.signals import StopFlag
from phileo.train.watchdog import heartbeat


class EvaluationInterrupted(Exception):
    """A stop signal arrived during a stoppable evaluation (all ranks agreed): end the launch for a requeue."""


class Metric(Protocol):
    """What Evaluator.metrics() needs: update per batch, all_reduce over ranks, compute the final values."""

    def update(self, outputs: torch.Tensor, labels: torch.Tensor) -> None: ...

    def all_reduce(self) -> None: ...

    def compute(self) -> dict[str, Any]: ...


def shard(dataset: Dataset, info: dist.DistInfo) -> Dataset:
    """This rank's share for evaluation: items rank, rank + world, ... (no padding, so sums are exact)."""
    if info.world_size == 1:
        return dataset
    return Subset(dataset, list(range(info.global_rank, len(dataset), info.world_size)))  # type: ignore[arg-type]


class Evaluator:
    """Runs `strategy`'s model over evaluation sets (see the module docstring).

    batch_size, num_workers: of the evaluation loaders; their workers ignore `stop_signals` (SLURM signals every
    process of the step: they must not die of USR2 while the main process checkpoints). stop: the run's StopFlag,
    polled by stoppable evaluations.
    """

    def __init__(self, strategy: Any, info: dist.DistInfo, bf16: bool, batch_size: int, num_workers: int,
                 stop_signals: list[str] = (), stop: StopFlag | None = None):
        self.strategy, self.info, self.bf16 = strategy, info, bf16
        self.batch_size, self.num_workers = batch_size, num_workers
        self.stop_signals, self.stop = list(stop_signals), stop
        self.device = torch.device(info.device)

    @property
    def model(self) -> nn.Module:
        """The bare model being trained (its weights are the training weights: load_state_dict changes them).
        Under ddp and zero1/2 it holds the full weights; under zero3 they are partitioned, so an evaluation there
        would have to run `strategy.module` (no task needs that today: fine-tuning refuses ZeRO)."""
        return self.strategy.model

    def state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 CPU weights of the model (on every rank; collective under zero3, so call it on all ranks)."""
        return self.strategy.full_state_dict()

    def loader(self, dataset: Dataset) -> DataLoader:
        """A DataLoader over this rank's share of `dataset`, in order."""
        init = _WorkerInit(self.stop_signals, None) if self.num_workers else None
        return DataLoader(shard(dataset, self.info), batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers, pin_memory=self.info.device.startswith("cuda"),
                          worker_init_fn=init)

    def _forward(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        batch = to_device(batch, self.device)
        with autocast(self.device, self.bf16):
            return model(batch["image"]), batch

    @torch.no_grad()
    def mean(self, dataset: Dataset, sum_and_count: Callable[[Any, dict[str, Any]], tuple[float, float]]) -> float:
        """sum / count over the whole of `dataset` (all ranks' shares), the same on every rank; NaN when the
        count is 0. sum_and_count(outputs, batch) gives one batch's (sum, count), e.g. a loss summed over pixels
        and the number of pixels."""
        model = self.model
        was_training = model.training
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64)
        try:
            for batch in self.loader(dataset):
                outputs, batch = self._forward(model, batch)
                heartbeat()  # a long validation is progress, not a hang
                total, count = sum_and_count(outputs, batch)
                sums += torch.tensor([float(total), float(count)], dtype=torch.float64)
        finally:
            model.train(was_training)
        sums = dist.all_reduce_(sums.to(self.device)).cpu()
        return float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")

    @torch.no_grad()
    def metrics(self, dataset: Dataset, metric: Metric, label_key: str = "label",
                stoppable: bool = False) -> dict[str, Any]:
        """`metric` over the whole of `dataset`: updated with (outputs as float, batch[label_key]) per batch,
        all-reduced, computed. stoppable: all ranks vote between batches on the stop flag and raise
        EvaluationInterrupted when one got a signal (ranks may hold one batch more or less: all take part in
        the same number of votes)."""
        model = self.model
        model.eval()
        loader = self.loader(dataset)
        n_batches = torch.tensor([float(len(loader))], device=self.device)
        n_max = int(dist.all_reduce_(n_batches, "max").item())
        it = iter(loader)
        for _ in range(n_max):
            if stoppable:
                flag = torch.tensor([float(self.stop is not None and self.stop.requested)], device=self.device)
                if dist.all_reduce_(flag, "max").item() > 0:
                    raise EvaluationInterrupted("stop signal during test evaluation")
            batch = next(it, None)
            if batch is None:
                continue
            outputs, batch = self._forward(model, batch)
            heartbeat()
            metric.update(outputs.float(), batch[label_key])
        metric.all_reduce()
        return metric.compute()


__all__ = ["Evaluator", "EvaluationInterrupted", "Metric", "shard"]
