"""The run's sample stream: its layout, the seeded resumable order, and the DataLoader around it.

Training is counted in optimizer steps, not epochs, so data comes as endless streams of (epoch, index) pairs: epoch
e of a stream is a permutation of its group's items seeded by (seed, e, group), cut into equal strided slices, one
per replica of the group. Datasets with `set_epoch(epoch)` (PretrainDataset: its random crops are a pure function
of (seed, epoch, index)) are told the epoch of each item inside the worker that loads it, so workers never share
or carry RNG state.

The global sample stream belongs to the run, not to the number of processes. A DataLayout, fixed at the run's
first start and saved in every checkpoint (trainer.pt "data_layout"), names V = G·R *virtual ranks* (G groups of
R replicas: for split="node" G nodes of R processes, for split="world" one group of all processes), the
micro-batch B and the accumulation A; the global batch is V·A·B. Virtual rank v = (g, l) reads
ResumableSampler(n_g, replica=l, num_replicas=R, group=g) over group g's dataset, micro-batch k being samples
[kB, (k+1)B) of it. Step s is made of the V·A *slots* (v, a), a < A, slot (v, a) being v's micro-batch number
(s-1)·A + a (s 1-based). W processes with A' micro-batches each (W·A' = V·A) share them: process r's micro-batch
m computes slot divmod(r·A' + m, A). On the layout the run started with this is v = r, a = m: each process reads
exactly its own stream. Every stream is at sample (s - from_step)·A·B + from_sample after step s, so the data
position is a function of the step alone.

Two ways to split the data among ranks (Task.split):
    "node":  the task's dataset is one node's share (PretrainDataset(node_rank=..., num_nodes=...)); the group is
             the node, its replicas the node's processes. A process may read several groups' virtual ranks
             (e.g. two nodes' streams resumed on one node): the engine builds one dataset per group it reads.
    "world": every rank sees the same dataset; one group, one replica per process (fine-tuning datasets).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from phileo.config import ConfigError
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


# ------------------------------------------------------------------------------------------ the run's layout
@dataclass(frozen=True)
class DataLayout:
    """The run's sample stream (module docstring): `replicas[g]` virtual ranks in group g (the same R in every
    group unless the first start had nodes with different process counts), micro-batch `micro_batch` (B),
    accumulation `grad_accum` (A); every stream is at sample from_sample + (step - from_step)·A·B after `step`
    (0 and 0 for a run started with layouts; a run resumed from a checkpoint written before them starts its
    layout there)."""

    replicas: tuple[int, ...]
    micro_batch: int
    grad_accum: int
    from_step: int = 0
    from_sample: int = 0

    def __post_init__(self):
        if not self.replicas or min(self.replicas) < 1 or self.micro_batch < 1 or self.grad_accum < 1:
            raise ValueError(f"invalid data layout {self}")

    @property
    def groups(self) -> int:
        return len(self.replicas)

    @property
    def virtual_ranks(self) -> int:
        """V: the number of streams; the LR scaling's world size (optim.lr_scaling) stays V on any resume."""
        return sum(self.replicas)

    @property
    def micro_batches_per_step(self) -> int:
        return self.virtual_ranks * self.grad_accum

    @property
    def global_batch(self) -> int:
        return self.micro_batches_per_step * self.micro_batch

    def describe(self) -> str:
        """"8 = 2 streams × 1 accumulation × 4 per micro-batch" (for messages)."""
        return (f"{self.global_batch} = {self.virtual_ranks} stream(s) × {self.grad_accum} accumulation × "
                f"{self.micro_batch} per micro-batch")

    def group_of(self, virtual_rank: int) -> tuple[int, int]:
        """(group, replica within the group) of a virtual rank."""
        for g, n in enumerate(self.replicas):
            if virtual_rank < n:
                return g, virtual_rank
            virtual_rank -= n
        raise ValueError(f"virtual rank out of range for {self}")

    def first_virtual_rank(self, group: int) -> int:
        return sum(self.replicas[:group])

    def position(self, step: int) -> int:
        """Samples every stream has consumed after optimizer step `step`."""
        return self.from_sample + (step - self.from_step) * self.grad_accum * self.micro_batch

    def valid_world_sizes(self, limit: int = 12) -> list[int]:
        """Process counts that keep the global batch (the divisors of V·A), at most `limit` of them."""
        n = self.micro_batches_per_step
        return [w for w in range(1, n + 1) if n % w == 0][:limit]

    def accum_for(self, world_size: int) -> int:
        """A': micro-batches per process and step that keep the global batch on `world_size` processes. Refuses
        (ConfigError) a count that does not divide V·A, naming those that do."""
        n = self.micro_batches_per_step
        if world_size < 1 or n % world_size:
            raise ConfigError(
                f"the run's global batch of {self.describe()} cannot be kept on {world_size} processes: its "
                f"{n} micro-batches per step do not divide among them. Resume on a process count that divides "
                f"{n} ({', '.join(map(str, self.valid_world_sizes()))}); another global batch needs a new run.dir "
                f"(a fine-tuning can start from this checkpoint's model.pt with model.init)")
        return n // world_size

    def slots(self, data_rank: int, world_size: int) -> list[tuple[int, int]]:
        """(virtual rank, micro-batch within the step) of each of this process's A' micro-batches, in order."""
        accum = self.accum_for(world_size)
        if not 0 <= data_rank < world_size:
            raise ValueError(f"data rank {data_rank} is outside {world_size} processes")
        return [divmod(data_rank * accum + m, self.grad_accum) for m in range(accum)]

    def to_dict(self) -> dict[str, Any]:
        uniform = len(set(self.replicas)) == 1
        return {"groups": self.groups,
                "replicas_per_group": self.replicas[0] if uniform else list(self.replicas),
                "micro_batch": self.micro_batch, "grad_accum": self.grad_accum,
                "from_step": self.from_step, "from_sample": self.from_sample}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DataLayout":
        r = d["replicas_per_group"]
        replicas = tuple(int(x) for x in r) if isinstance(r, (list, tuple)) else (int(r),) * int(d["groups"])
        return cls(replicas, int(d["micro_batch"]), int(d["grad_accum"]), int(d.get("from_step", 0)),
                   int(d.get("from_sample", 0)))


def start_layout(split: str, world_size: int, processes_per_node: Sequence[int], micro_batch: int,
                 grad_accum: int) -> DataLayout:
    """The layout a run records at its first start: for split="node" one group per node of its process count
    (`processes_per_node`, indexed by node rank), for split="world" one group of all `world_size` processes."""
    if split == "node":
        return DataLayout(tuple(int(n) for n in processes_per_node), micro_batch, grad_accum)
    if split == "world":
        return DataLayout((world_size,), micro_batch, grad_accum)
    raise ValueError(f"split must be 'node' or 'world', got {split!r}")


def data_rank(layout: DataLayout, split: str, info: DistInfo, processes_per_node: Sequence[int]) -> int:
    """Which r of the slot rule this process is: on the layout the run started with (split="node": the same nodes
    with the same process counts) the virtual rank of (node_rank, local_rank), so each process reads its own
    stream whatever the launcher's rank order; on any other layout its global rank."""
    if split == "node" and tuple(processes_per_node) == layout.replicas:
        return layout.first_virtual_rank(info.node_rank) + info.local_rank
    return info.global_rank


@dataclass(frozen=True)
class ResumePlan:
    """What a (re)start does with the data: the run's `layout`, this launch's accumulation `grad_accum` (A'),
    `note` (one line for the log, or None), `warn` (the note is a warning: order or random streams restart),
    `legacy_position` (a checkpoint written before layouts on the same process count: the stream position is
    the rank file's samples_consumed)."""

    layout: DataLayout
    grad_accum: int
    note: str | None = None
    warn: bool = False
    legacy_position: bool = False


def plan_resume(fresh: DataLayout, world_size: int, checkpoint: Mapping[str, Any] | None = None) -> ResumePlan:
    """How this launch reads the run's data (see the module docstring). `fresh`: the layout a first start of
    this launch would record (start_layout with the config's data.batch_size and train.grad_accum_steps);
    `checkpoint`: None for a first start, else the newest checkpoint's trainer.pt fields "step", "world_size",
    "data_layout" (absent before layouts) and "grad_accum_steps" (the accumulation that wrote it).

    The global batch is kept: on W processes A' = V·A / W. Refuses (ConfigError, naming the global batch, its
    factors and what to do) a W that does not divide V·A, a data.batch_size other than the run's B, and a
    train.grad_accum_steps that is neither the run's A, nor A', nor the one the checkpoint was written with (a
    deliberate change of the global batch). A checkpoint written before layouts resumes as before: on the same
    process count exactly (its layout starts there, from the rank files' position), on another with a warning
    that the data order and random streams start afresh.
    """
    if checkpoint is None:
        return ResumePlan(fresh, fresh.grad_accum)
    step = int(checkpoint["step"])
    written_by = checkpoint.get("world_size")
    saved = checkpoint.get("data_layout")
    if saved is None:
        if written_by == world_size:
            return ResumePlan(replace(fresh, from_step=step), fresh.grad_accum, legacy_position=True)
        layout = replace(fresh, from_step=step, from_sample=step * fresh.grad_accum * fresh.micro_batch)
        return ResumePlan(layout, fresh.grad_accum, warn=True, note=(
            f"the checkpoint of step {step} was written by {written_by} processes before data layouts were "
            f"recorded; resuming with {world_size}: data order and random streams start afresh at step {step} "
            f"(training continues, but not as the uninterrupted run would have), global batch "
            f"{layout.describe()} from now on"))
    layout = DataLayout.from_dict(saved)
    if fresh.micro_batch != layout.micro_batch:
        raise ConfigError(
            f"data.batch_size={fresh.micro_batch}, but this run was started with {layout.micro_batch} per "
            f"micro-batch (global batch {layout.describe()}); the global batch and sample order belong to the "
            f"run: set data.batch_size={layout.micro_batch} (train.grad_accum_steps adapts to the number of "
            f"processes); another global batch needs a new run.dir")
    accum = layout.accum_for(world_size)
    asked = fresh.grad_accum
    allowed = {layout.grad_accum, accum, int(checkpoint.get("grad_accum_steps") or layout.grad_accum)}
    if asked not in allowed:
        raise ConfigError(
            f"train.grad_accum_steps={asked} would change this run's global batch of {layout.describe()}: on "
            f"{world_size} process(es) it is kept with train.grad_accum_steps={accum}; set that (or leave "
            f"{layout.grad_accum}, the run's own); another global batch needs a new run.dir")
    note = None
    if written_by != world_size or accum != asked:
        note = (f"resuming on {world_size} process(es) (the checkpoint was written by {written_by}): "
                f"train.grad_accum_steps {asked} → {accum} keeps the global batch of {layout.global_batch} "
                f"({layout.micro_batch} per micro-batch) and the sample order")
    return ResumePlan(layout, accum, note=note)


# ------------------------------------------------------------------------------------ datasets and batches
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


class GroupIndexed(Dataset):
    """The datasets of the groups this process reads, fetched by (group, epoch, index); each is an EpochIndexed."""

    def __init__(self, datasets: Mapping[int, Dataset]):
        self.parts = {int(g): EpochIndexed(d) for g, d in datasets.items()}

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts.values())

    def __getitem__(self, key: tuple[int, int, int]) -> Any:
        group, epoch, index = key
        return self.parts[group][(epoch, index)]


class SlotBatchSampler(Sampler):
    """This process's micro-batches, endless: for each step after `start_step`, one list of B keys (group,
    epoch, index) per slot of `slots` (DataLayout.slots), in order. `sizes`: items per group read."""

    def __init__(self, layout: DataLayout, slots: Sequence[tuple[int, int]], sizes: Mapping[int, int], seed: int,
                 start_step: int = 0, shuffle: bool = True):
        self.layout, self.slots = layout, [tuple(s) for s in slots]
        self.start_step = start_step
        start = layout.position(start_step)
        self.streams: dict[int, ResumableSampler] = {}
        for v in dict.fromkeys(v for v, _ in self.slots):
            g, replica = layout.group_of(v)
            self.streams[v] = ResumableSampler(sizes[g], replica, layout.replicas[g], seed=seed, group=g,
                                               start_sample=start, shuffle=shuffle)

    @property
    def per_rank(self) -> int:
        """Samples per epoch of the shortest stream read (one epoch = one pass of a stream over its share)."""
        return min(s.per_rank for s in self.streams.values())

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        b, a_total = self.layout.micro_batch, self.layout.grad_accum
        wanted = {v: {a for vv, a in self.slots if vv == v} for v in self.streams}
        its = {v: iter(s) for v, s in self.streams.items()}
        while True:
            step: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
            for v, it in its.items():
                g = self.streams[v].group
                for a in range(a_total):  # every stream moves on by a whole step, read or not
                    keys = [(g, e, i) for e, i in itertools.islice(it, b)]
                    if a in wanted[v]:
                        step[(v, a)] = keys
            for slot in self.slots:
                yield step[slot]

    def __len__(self) -> int:
        raise TypeError("SlotBatchSampler is endless; count training in steps")


class _WorkerInit:
    """Picklable worker_init_fn (spawned workers need one): ignore the stop signals, then the dataset's own."""

    def __init__(self, signal_names: list[str], user_init: Callable[[int], None] | None):
        self.signal_names, self.user_init = list(signal_names), user_init

    def __call__(self, worker_id: int) -> None:
        ignore_signals(self.signal_names)
        if self.user_init is not None:
            self.user_init(worker_id)


def build_loader(datasets: Mapping[int, Dataset], layout: DataLayout, slots: Sequence[tuple[int, int]],
                 info: DistInfo, num_workers: int, seed: int, start_step: int = 0, pin_memory: bool = True,
                 prefetch_factor: int = 2, stop_signals: list[str] = (), collate_fn: Callable | None = None,
                 worker_init_fn: Callable[[int], None] | None = None) -> tuple[DataLoader, SlotBatchSampler]:
    """The endless DataLoader of this process: one item per micro-batch of `slots`, from the streams of the
    virtual ranks they name, starting after optimizer step `start_step`. `datasets`: {group: dataset} for every
    group the slots read. Worker processes ignore `stop_signals` (the main process handles them). Returns
    (loader, batch sampler)."""
    sizes = {g: len(d) for g, d in datasets.items()}  # type: ignore[arg-type]
    sampler = SlotBatchSampler(layout, slots, sizes, seed=seed, start_step=start_step)
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=prefetch_factor,
                      worker_init_fn=_WorkerInit(list(stop_signals), worker_init_fn))
    loader = DataLoader(GroupIndexed(datasets), batch_sampler=sampler, num_workers=num_workers,
                        pin_memory=pin_memory and info.device.startswith("cuda"), collate_fn=collate_fn,
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


__all__ = ["DataLayout", "ResumePlan", "plan_resume", "start_layout", "data_rank", "ResumableSampler",
           "EpochIndexed", "GroupIndexed", "SlotBatchSampler", "build_loader", "epoch_permutation", "to_device"]
