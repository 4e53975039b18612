"""Resumable data order: an endless, seeded sampler whose position is one integer, and the DataLoader around it.

Training is counted in optimizer steps, not epochs, so each rank draws from an endless stream of (epoch, index)
pairs: epoch e is a permutation of the items seeded by (seed, e, group), cut into equal strided slices, one per
rank of the group. The stream's position is the number of samples this rank has consumed, so a checkpoint
stores one integer per rank and a resumed run starts the stream exactly there. Datasets with `set_epoch(epoch)`
(PretrainDataset: its random crops are a pure function of (seed, epoch, index)) are told the epoch of each item
inside the worker that loads it, so workers never share or carry RNG state.

Two ways to split a dataset among ranks:
    "node":  the dataset is already this node's share (PretrainDataset(node_rank=..., num_nodes=...)); the
             node's local ranks split it (group = node_rank).
    "world": every rank sees the same dataset; all ranks split it (fine-tuning datasets).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from phileo.train.dist import DistInfo
from phileo.train.signals import ignore_signals


def epoch_permutation(num_items: int, seed: int, epoch: int, group: int) -> np.ndarray:
    """The item order of `epoch` for a rank group (node, or the world): a seeded permutation of range(num_items)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, group, 0x5EED]))
    return rng.permutation(num_items)


class ResumableSampler(Sampler):
    """An endless stream of (epoch, index) for one rank, starting after `start_sample` consumed samples.

    Each epoch, the permutation of epoch_permutation(num_items, seed, epoch, group) is dealt round-robin to
    `num_replicas` ranks and truncated so every rank gets the same number, `per_rank` = num_items // num_replicas.
    Refuses a dataset with fewer items than ranks (a rank with nothing to read would stall the others).
    """

    def __init__(self, num_items: int, replica: int, num_replicas: int, seed: int = 0, group: int = 0,
                 start_sample: int = 0, shuffle: bool = True):
        if num_items < num_replicas:
            raise ValueError(f"the dataset has {num_items} items for {num_replicas} ranks: every rank needs at "
                             f"least one; use fewer processes per node or more data (for PretrainDataset: more "
                             f"cells per node, i.e. fewer nodes)")
        self.num_items, self.replica, self.num_replicas = num_items, replica, num_replicas
        self.seed, self.group, self.shuffle = seed, group, shuffle
        self.per_rank = num_items // num_replicas
        self.start_sample = start_sample

    def position(self, consumed: int) -> tuple[int, int]:
        """(epoch, offset within the epoch) after `consumed` samples of this rank."""
        return divmod(consumed, self.per_rank)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = self.position(self.start_sample)
        while True:
            order = (epoch_permutation(self.num_items, self.seed, epoch, self.group) if self.shuffle
                     else np.arange(self.num_items))
            mine = order[self.replica::self.num_replicas][:self.per_rank]
            for i in mine[offset:]:
                yield epoch, int(i)
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # DataLoader only asks when someone calls len(loader); the stream is endless
        raise TypeError("ResumableSampler is endless; count training in steps")


class EpochIndexed(Dataset):
    """Wraps a dataset so that items are fetched by (epoch, index), calling dataset.set_epoch(epoch) first when the
    dataset has it and the epoch changed (inside whichever worker process loads the item)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self._epoch: int | None = None
        self._has_set_epoch = callable(getattr(dataset, "set_epoch", None))

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        if self._has_set_epoch and epoch != self._epoch:
            self.dataset.set_epoch(epoch)
            self._epoch = epoch
        return self.dataset[index]


class _WorkerInit:
    """Picklable worker_init_fn (spawned workers need one): ignore the stop signals, then the dataset's own."""

    def __init__(self, signal_names: list[str], user_init: Callable[[int], None] | None):
        self.signal_names, self.user_init = list(signal_names), user_init

    def __call__(self, worker_id: int) -> None:
        ignore_signals(self.signal_names)
        if self.user_init is not None:
            self.user_init(worker_id)


def build_loader(dataset: Dataset, info: DistInfo, batch_size: int, num_workers: int, seed: int,
                 start_sample: int = 0, split: str = "world", pin_memory: bool = True, prefetch_factor: int = 2,
                 stop_signals: list[str] = (), collate_fn: Callable | None = None,
                 worker_init_fn: Callable[[int], None] | None = None) -> tuple[DataLoader, ResumableSampler]:
    """The endless DataLoader of this rank and its sampler (see module docstring for `split`).

    Worker processes ignore `stop_signals` (the main process handles them). Returns (loader, sampler).
    """
    if split == "node":
        replica, replicas, group = info.local_rank, info.local_world_size, info.node_rank
    elif split == "world":
        replica, replicas, group = info.global_rank, info.world_size, 0
    else:
        raise ValueError(f"split must be 'node' or 'world', got {split!r}")
    sampler = ResumableSampler(len(dataset), replica, replicas, seed=seed, group=group,  # type: ignore[arg-type]
                               start_sample=start_sample)
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=prefetch_factor,
                      worker_init_fn=_WorkerInit(list(stop_signals), worker_init_fn))
    loader = DataLoader(EpochIndexed(dataset), batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        pin_memory=pin_memory and info.device.startswith("cuda"), drop_last=True,
                        collate_fn=collate_fn,
                        # Worker base seeds from our own generator, not the global RNG: creating the loader
                        # must not shift the RNG stream a resumed run restores.
                        generator=torch.Generator().manual_seed(seed * 1000 + info.global_rank), **kwargs)
    return loader, sampler


def to_device(batch: Any, device: torch.device) -> Any:
    """Moves every tensor of a (nested) batch to `device` (non-blocking from pinned memory); leaves the rest."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


__all__ = ["ResumableSampler", "EpochIndexed", "build_loader", "epoch_permutation", "to_device"]
