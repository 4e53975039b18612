"""The training engine: one loop for every job (pretraining, fine-tuning), driven by a Task.

The Trainer wires small components, each in its own module and tested alone: CheckpointManager (checkpoint.py:
save, list, verify, load, retention), StopPolicy (stop.py: steps, early stop, signals, launch limit), Evaluator
(evaluate.py: validation and test loops), MetricsLogger (metrics.py: log.txt, metrics.jsonl, TensorBoard) and the
parallel Strategy (strategy.py: DDP or DeepSpeed ZeRO). A job is a Task (model, batches, loss, evaluation) plus
its config (the recipe).

    trainer = Trainer(cfg, task)      # cfg: a JobConfig (sections model, data, optim, train, checkpoint, run)
    result = trainer.fit()            # TrainResult(status="completed" | "preempted" | "failed", step, ...)

What `fit()` does, in order:
 1. returns at once if run.dir holds a DONE marker for at least train.steps (or an early stop) and the task has
    no test;
 2. sets up the run folder (config.yaml, env.json, log.txt, TensorBoard, deepspeed_config.json);
 3. decides the run's data layout (phileo.train.loader: fixed at the first start, read back from the newest
    checkpoint's trainer.pt) and this launch's accumulation, which keeps the run's global batch and sample
    order on any number of processes that divides it (refused otherwise, with the counts that work); builds
    the training dataset of every group this process reads; seeds, builds the model (identical on every
    rank), wraps it (DDP or ZeRO), and resumes from the newest complete checkpoint by step number: weights,
    optimizer, scheduler (ZeRO on another process count through DeepSpeed's universal checkpoint), task
    state, and, on the same process count, each rank's RNG states, so the resumed run computes exactly what
    the uninterrupted one would have (on another count: the same samples, augmentation and losses up to
    float summation order; process-global random streams such as dropout restart);
 4. per step: the launch's micro-batches (train.grad_accum_steps, or what keeps the global batch after a
    resume on another process count; forward under bf16/fp16 autocast if asked, loss, backward), one
    all-reduce that carries the losses for logging, a non-finite flag and the stop-signal flag, then the optimizer
    step (clipping, schedule);
 5. logs scalars every run.log_every_steps, images every run.image_every_steps, runs the task's evaluate() every
    train.eval_every_steps, checkpoints every checkpoint.every_steps and at the end;
 6. stops cleanly: at train.steps (DONE marker, status "completed"), when the task asks to stop early
    ("completed"), on a stop signal or after train.max_steps_per_launch steps (checkpoint, "preempted"), on a
    NaN/Inf loss or gradient norm ("failed", naming the step and the term; nothing is saved, so the newest
    checkpoint is the last good one);
 7. after a completed run, a task with a test (Task.has_test) runs it once: its scalars are logged at the final
    step and the task writes its outputs (on_complete). A run found DONE whose task has a test resumes from its
    newest checkpoint to run the test (a crash after training but before the outputs); a stop signal during the
    test ends the launch "preempted".
An exception on one rank propagates; the other ranks then fail in their next collective (the peer is gone) or
after train.dist_timeout_s, and under srun --kill-on-bad-exit / torchrun the job ends. A rank that finishes no
step, evaluation or save for run.hang_timeout_s writes its stacks to RUN/stacks/ and exits 1 (watchdog.py).
Global rank 0 holds RUN/run.lock while it trains (phileo.run_lock): a second writer is refused.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from phileo import run_lock
from phileo.config import ConfigError, save_config, to_dict
from phileo.fsutil import atomic_write_json, make_group_readable
from phileo.run_state import is_retryable, update_state
from phileo.train import dist
from phileo.train.checkpoint import CheckpointManager, capture_rng_state, checkpoint_step, restore_rng_state
from phileo.train.evaluate import EvaluationInterrupted, Evaluator
from phileo.train.loader import DataLayout, build_loader, data_rank, plan_resume, start_layout, to_device
from phileo.train.metrics import (LossWindow, MetricsLogger, ThroughputWindow, fmt4, host_record, peak_tflops,
                                  write_env_json)
from phileo.train.precision import autocast, grad_scaler, resolve_precision
from phileo.train.run_recorder import RunStateRecorder
from phileo.train.stop import Decision, StopPolicy, steps_per_epoch
from phileo.train.strategy import build_strategy
from phileo.train.watchdog import HangWatchdog, timeout_note

log = logging.getLogger("phileo.train")


@dataclass
class TrainResult:
    """How fit() ended. status: "completed" (train.steps reached or early stop; DONE written), "preempted"
    (stopped with a checkpoint by a signal or train.max_steps_per_launch: run again to continue), "failed"
    (non-finite loss or gradient; `message` says where). step: the last optimizer step taken; final_loss: the
    mean loss of that step over all ranks (None if no step was taken in this or an earlier launch).
    final_loss is the mean over the last run.log_every_steps steps (LossWindow), not one batch.
    metrics: the task's test scalars when it has a test and it ran."""

    status: str
    step: int
    final_loss: float | None
    run_dir: Path
    message: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False


@dataclass
class StepContext:
    """What a task may need to know about the micro-batch it is computing.

    `micro_step` and `global_rank` say where it is computed (this process, its micro-batch of the step);
    `virtual_rank` and `virtual_micro_step` which slot of the run's global batch it is (phileo.train.loader:
    the stream it comes from and its micro-batch within the step). On the layout the run started with they are
    the same numbers; after a resume on another number of processes they differ. None: the physical ones."""

    step: int  # 1-based index of the optimizer step being computed
    micro_step: int  # 0 .. this launch's micro-batches per step - 1
    global_rank: int
    seed: int
    device: torch.device
    virtual_rank: int | None = None
    virtual_micro_step: int | None = None

    def generator(self) -> torch.Generator:
        """A generator on the device seeded from (seed, step, virtual_micro_step, virtual_rank): augmentation
        drawn from it follows the sample it is applied to, so it is the same in a resumed run (on any number of
        processes) and differs between streams and steps."""
        rank = self.global_rank if self.virtual_rank is None else self.virtual_rank
        micro = self.micro_step if self.virtual_micro_step is None else self.virtual_micro_step
        mixed = np.random.SeedSequence([self.seed, self.step, micro, rank]).generate_state(2)
        g = torch.Generator(device=self.device)
        g.manual_seed(int(mixed[0]) << 32 | int(mixed[1]))
        return g


class Task:
    """What a job trains: subclass and override. The Trainer owns everything else.

    Required: build_model(), train_dataset(info) (called first), compute_loss(outputs, batch).
    Optional hooks (defaults shown in the methods): prepare_data() (just before train_dataset), forward(),
    evaluate(), should_stop(), test(), on_complete(), images(), train_flops_per_sample(), hparams(),
    state_dict()/load_state_dict() (saved in every checkpoint).
    `split` says how train_dataset() is shared among ranks: "world" (same dataset on every rank, all ranks split it)
    or "node" (the dataset already is one node's share, info.node_rank of info.num_nodes; that node's processes
    split it). The data layout belongs to the run (phileo.train.loader), so with split="node" a process resumed
    on another number of nodes or processes may read the streams of other nodes of the run's first start: the
    engine then calls train_dataset once per node share it reads, with info.node_rank and info.num_nodes set to
    that share (the other fields stay this process's).
    `has_test`: the task has a final test (test() and on_complete() run once the run is complete).
    """

    split = "world"
    name = "task"  # a short name for logs and hparams
    has_test = False

    def build_model(self) -> nn.Module:
        """The bare model, on CPU; called after train_dataset() and after seeding with train.seed on every rank
        (identical weights). Parameters left with requires_grad=False are neither synchronised nor optimised."""
        raise NotImplementedError

    def train_dataset(self, info: dist.DistInfo) -> Dataset:
        """The map-style training dataset of node share info.node_rank of info.num_nodes (split="node": may be
        called once per share this process reads, see the class docstring) or of the whole job ("world")."""
        raise NotImplementedError

    def prepare_data(self, info: dist.DistInfo) -> Mapping[str, float] | None:
        """Called on every rank, together (collectives allowed), at each start just before train_dataset():
        checks the data (pretraining verifies its chunk files) and raises to stop every rank before anything is
        trained. For split="node", info.num_nodes is the number of node shares the run's data is read in (fixed
        at its first start; phileo.train.loader.DataLayout) and info.node_rank the first share this process
        reads. Returns scalars to log once at the start step (e.g. {"data/bad_chunks": 1}), or None."""
        return None

    def forward(self, model: nn.Module, batch: dict[str, Any], ctx: StepContext) -> Any:
        """Runs the (wrapped) model on a device batch; default model(batch["image"])."""
        return model(batch["image"])

    def compute_loss(self, outputs: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss to minimise, {term: 0-d tensor}) for one micro-batch; the term names must be the same on every
        rank and step (they are all-reduced together)."""
        raise NotImplementedError

    def evaluate(self, evaluator: Evaluator, step: int) -> dict[str, float] | None:
        """Called on every rank every train.eval_every_steps; returns scalars to log (e.g. {"val/loss": ...}).
        Measure through `evaluator` (its loops reduce over ranks, so every rank returns the same values and
        should_stop() agrees)."""
        return None

    def should_stop(self) -> bool:
        """Asked after evaluate(): True ends training early (e.g. early stopping on validation loss)."""
        return False

    def test(self, evaluator: Evaluator, step: int) -> dict[str, float] | None:
        """When has_test: called on every rank once the run is complete (step: its final step); returns scalars
        to log at that step (e.g. {"test/rmse": ...}). evaluator.metrics(..., stoppable=True) lets a stop signal
        end the launch."""
        return None

    def on_complete(self, run_dir: Path, result: TrainResult) -> None:
        """When has_test: called on every rank after test()'s scalars are logged, to write the task's outputs."""

    def images(self, outputs: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """{tag: CHW image in [0, 1]} to log every run.image_every_steps (global rank 0)."""
        return {}

    def train_flops_per_sample(self, model: nn.Module) -> float | None:
        """FLOPs of one training sample (forward + backward), for MFU; None when unknown."""
        fn = getattr(model, "flops_per_sample", None)
        return 3.0 * float(fn()) if callable(fn) else None

    def hparams(self) -> dict[str, Any]:
        return {}

    def hparam_metrics(self) -> list[str]:
        """Scalar tags TensorBoard's HPARAMS tab shows beside the hparams."""
        return ["loss/total"]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


@dataclass
class StepOutput:
    """One optimizer step, reduced over ranks."""

    loss: float
    terms: dict[str, float]
    lr: float
    grad_norm: float | None
    stop_requested: bool
    kept: tuple[Any, Any] | None  # (outputs, batch) of the last micro-batch, for images


class Trainer:
    """Runs a Task under the job config `cfg` (a phileo.train.config.JobConfig: sections train, optim, checkpoint,
    run, and data with the loader keys). `info`: the distributed layout; None = init_distributed() from the
    environment (a ZeRO strategy gets a process group even with one process).

    After fit(): `model` is the bare module, `strategy` the DDP/DeepSpeed wrapper, `step` the last step.
    `model_state_dict()` gives fp32 weights on every rank (collective under zero3).
    """

    def __init__(self, cfg: Any, task: Task, info: dist.DistInfo | None = None):
        self.cfg = cfg
        self.task = task
        self.info = info or dist.init_distributed(device=cfg.train.device, timeout_s=cfg.train.dist_timeout_s,
                                                  force_process_group=cfg.train.strategy != "ddp")
        if cfg.train.strategy != "ddp" and not dist.is_initialized():
            raise RuntimeError("a ZeRO strategy needs a process group: pass info=None to let the Trainer create "
                               "one, or call phileo.train.dist.init_distributed(force_process_group=True) first")
        self.run_dir = Path(cfg.run.dir)
        self.device = torch.device(self.info.device)
        self.precision = resolve_precision(cfg.train.precision, self.info.device)  # "fp32" | "bf16" | "fp16"
        self.bf16 = self.precision == "bf16"
        self.checkpoints = CheckpointManager(self.run_dir, cfg.checkpoint.keep_last, self.info)
        self.stop = StopPolicy.from_config(cfg)
        self.metrics = MetricsLogger(self.run_dir, self.info.global_rank, cfg.run.tensorboard)
        self.state = RunStateRecorder(self.run_dir, self.info.is_main)  # state.json, for phileo-status
        self.losses = LossWindow(cfg.run.log_every_steps)
        self.model: nn.Module | None = None
        self.strategy: Any = None
        self.evaluator: Evaluator | None = None
        self.throughput: ThroughputWindow | None = None
        self.step = 0
        self.last_loss: float | None = None
        # The run's data layout and this launch's share of it (_plan_data): micro-batches per step and the slot
        # (virtual rank, its micro-batch) each of them computes.
        self.layout: DataLayout | None = None
        self.grad_accum = cfg.train.grad_accum_steps
        self.slots: list[tuple[int, int]] = []
        self._load_universal = False
        self._legacy_position = False
        self._warned = False

    @property
    def world_batch(self) -> int:
        """The global batch: the run's (kept on any number of processes), B × A × world size at its start."""
        if self.layout is not None:
            return self.layout.global_batch
        return self.cfg.data.batch_size * self.grad_accum * self.info.world_size

    @property
    def samples_consumed(self) -> int:
        """Samples each of the run's streams has consumed after the current step."""
        return self.layout.position(self.step) if self.layout is not None else 0

    @property
    def final_loss(self) -> float | None:
        """The mean loss of the last run.log_every_steps steps (the last step's before any window exists)."""
        return self.losses.total if self.losses.steps else self.last_loss

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 CPU weights of the bare model (on every rank; collective under zero3, so call it on all ranks)."""
        return self.strategy.full_state_dict()

    # ------------------------------------------------------------------------------------------- the recipe
    def fit(self) -> TrainResult:
        """Trains to train.steps (resuming if the run folder has checkpoints); see the module docstring."""
        done = self.checkpoints.done()
        finished = self.stop.covered_by(done)
        if finished and not self.task.has_test:
            self.step = int(done["step"])
            log.info("%s is already complete (DONE at step %d): nothing to do", self.run_dir, self.step)
            return TrainResult("completed", self.step, done.get("final_loss"), self.run_dir,
                               message="already complete", stopped_early=bool(done.get("stopped_early")))
        self._take_run_lock()
        try:
            self._setup_run_dir()
            with self.metrics:
                try:
                    result = self._fit(done, finished)
                    return self._test(result) if result.status == "completed" and self.task.has_test else result
                except ConfigError as e:  # a refusal that says what to do: into log.txt without a traceback
                    log.error("%s", e)
                    self.state.final_failure(e)
                    raise
                except Exception as e:
                    # Into log.txt too (rank 0), not just the job's stderr; the exception still ends this rank.
                    log.exception("training failed on global rank %d at step %d", self.info.global_rank,
                                  self.step + 1)
                    if not is_retryable(e):  # a corrupt chunk: a retry would fail on the same bytes
                        self.state.final_failure(e)
                    raise
                finally:
                    self.stop.restore()
        finally:
            if self.info.is_main:
                run_lock.release(self.run_dir)

    def _take_run_lock(self) -> None:
        """One writer per run folder: global rank 0 takes RUN/run.lock (phileo.run_lock) before anything is
        written, and records the owner in state.json; every rank refuses together when a live job holds it."""
        problem = None
        if self.info.is_main:
            try:
                owner = run_lock.acquire(self.run_dir)
                update_state(self.run_dir, event="lock", detail=run_lock.describe(owner), lock=owner)
            except run_lock.RunLocked as e:
                problem = str(e)
        problem = dist.broadcast_object(problem)
        if problem:
            raise run_lock.RunLocked(problem)

    def _fit(self, done: Mapping[str, Any] | None, finished: bool) -> TrainResult:
        """Set-up, resume, then the loop; `done`: the DONE marker, `finished`: it covers train.steps (the run
        only needs its test)."""
        latest = self.checkpoints.latest()
        if finished and latest is None:
            raise FileNotFoundError(f"{self.run_dir} is marked DONE but has no checkpoint to test; delete "
                                    f"{self.run_dir / 'DONE'} to train again")
        # Before the config is recorded (a refused launch changes nothing) and before the strategy is built (the
        # accumulation that keeps the global batch goes into DeepSpeed's config).
        self._plan_data(latest)
        self._record_config(done, finished)
        done = done if finished else None
        # The task's data checks, on every rank together: bad data stops the job here, having trained nothing.
        self.metrics.at_start(self.task.prepare_data(self._data_view()))
        # The datasets next: opening them is cheap, and a task may shape its model by what the data holds
        # (pretraining trains the auxiliary heads only when the shards carry their targets).
        datasets = self._train_datasets()
        flops = self._build_model()
        rng_state = self._resume(latest)
        loader = self._loader(datasets)
        peak = self._describe_run(latest, flops)
        if done is not None:
            log.info("training is complete (DONE at step %d): running the test only", self.step)
            return TrainResult("completed", self.step, self.last_loss, self.run_dir, message="already complete",
                               stopped_early=bool(done.get("stopped_early")))
        if self.step >= self.cfg.train.steps:
            return self._finish(self.step, saved=True)
        self.stop.install()  # before the loader forks its workers, so they inherit our handlers, not SIG_DFL
        data_iter = iter(loader)
        if rng_state is not None:
            restore_rng_state(rng_state)  # last, so nothing above shifts the restored streams
        try:
            return self._loop(data_iter, flops, peak)
        finally:
            # Stop the workers now rather than whenever an exception's traceback lets go of the iterator.
            shutdown = getattr(data_iter, "_shutdown_workers", None)
            if callable(shutdown):
                shutdown()

    def _loop(self, data_iter: Iterator, flops: float | None, peak: float | None) -> TrainResult:
        self.throughput = ThroughputWindow(self.world_batch, self.info.world_size, self.info.device, flops, peak)
        note = timeout_note(self.cfg.run.hang_timeout_s, self.cfg.train.dist_timeout_s)
        if note and self.info.distributed and self.info.is_main:
            log.warning(note)
        with HangWatchdog(self.run_dir, self.info.global_rank, self.cfg.run.hang_timeout_s) as watchdog:
            while True:
                out = self._train_step(data_iter)
                watchdog.beat()
                if isinstance(out, TrainResult):
                    return out  # failed: nothing is saved
                self._log_step(out)
                decision = self.stop.after_step(self.step, out.stop_requested, self._evaluate(), train_loss=out.loss)
                watchdog.beat()
                if decision.save:
                    self.save_checkpoint(self.step)
                    watchdog.beat()
                if decision.stop:
                    return self._stop(decision)

    # ----------------------------------------------------------------------------------------------- set-up
    def _setup_run_dir(self) -> None:
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            make_group_readable(self.run_dir, directory=True)
            for removed in self.checkpoints.clean_stale():
                log.info("deleted a half-written checkpoint from an earlier crash: %s", removed)
        dist.barrier()

    def _record_config(self, done: Mapping[str, Any] | None, finished: bool) -> None:
        """config.yaml (the config as given, whatever accumulation this launch uses); DONE removed when
        train.steps was raised past a finished run."""
        if self.info.is_main:
            save_config(self.cfg, self.run_dir / "config.yaml")
        if done is not None and not finished:
            # train.steps was raised past a finished run: it is not finished any more until the new end.
            self.checkpoints.clear_done()
        dist.barrier()

    def _plan_data(self, latest: Path | None) -> None:
        """The run's data layout (fixed at its first start, read back from the newest checkpoint's trainer.pt),
        this launch's micro-batches per step, and the slots this process computes (collective). Refuses, on every
        rank alike, a resume that cannot keep the run's global batch (phileo.train.loader.plan_resume)."""
        cfg, info = self.cfg, self.info
        split = self.task.split
        per_node = self._processes_per_node() if split == "node" else [info.world_size]
        fresh = start_layout(split, info.world_size, per_node, cfg.data.batch_size, cfg.train.grad_accum_steps)
        written = self.checkpoints.peek(latest) if latest is not None else None
        plan = plan_resume(fresh, info.world_size, written)
        self.layout, self.grad_accum, self._legacy_position = plan.layout, plan.grad_accum, plan.legacy_position
        self._warned = plan.warn
        self.slots = plan.layout.slots(data_rank(plan.layout, split, info, per_node), info.world_size)
        # ZeRO's optimizer partitions follow the process count: another count loads DeepSpeed's universal form.
        self._load_universal = (written is not None and cfg.train.strategy != "ddp"
                                and written.get("world_size") != info.world_size)
        if plan.note:
            (log.warning if plan.warn else log.info)("%s", plan.note)

    def _processes_per_node(self) -> list[int]:
        """Processes on each node, by node rank (collective)."""
        info = self.info
        seen: dict[int, int] = {}
        for node, count in dist.all_gather_object((info.node_rank, info.local_world_size)):
            if seen.setdefault(node, count) != count:
                raise RuntimeError(f"node {node} reports both {seen[node]} and {count} local processes: check the "
                                   f"launcher's LOCAL_WORLD_SIZE / SLURM_TASKS_PER_NODE")
        if sorted(seen) != list(range(info.num_nodes)):
            raise RuntimeError(f"processes report node ranks {sorted(seen)} for {info.num_nodes} nodes: check the "
                               f"launcher's GROUP_RANK / SLURM_NODEID")
        return [seen[n] for n in range(info.num_nodes)]

    def _groups_read(self) -> list[int]:
        """The node shares (groups of the run's data layout) this process's slots read, usually just its own."""
        return sorted({self.layout.group_of(v)[0] for v, _ in self.slots})

    def _data_view(self) -> dist.DistInfo:
        """This process as the task's data sees it (Task.prepare_data): for split="node", num_nodes is the number
        of node shares of the run's data layout, fixed at its first start, and node_rank the first share this
        process reads; for split="world" the process itself."""
        if self.task.split == "world":
            return self.info
        return replace(self.info, node_rank=self._groups_read()[0], num_nodes=self.layout.groups)

    def _train_datasets(self) -> dict[int, Dataset]:
        """{group: training dataset} for every group this process's slots read: the whole job's (group 0) for
        split="world"; for split="node" the node share of each group, usually just this node's own."""
        if self.task.split == "world":
            return {0: self.task.train_dataset(self.info)}
        return {g: self.task.train_dataset(replace(self.info, node_rank=g, num_nodes=self.layout.groups))
                for g in self._groups_read()}

    def _seed_all(self, seed: int) -> None:
        import random

        torch.manual_seed(seed)
        np.random.seed(seed % 2 ** 32)
        random.seed(seed)

    def _build_model(self) -> float | None:
        """Seeds, builds the task's model (identical on every rank) and wraps it; returns its training FLOPs
        per sample (global rank 0)."""
        cfg, info = self.cfg, self.info
        self._seed_all(cfg.train.seed)
        model = self.task.build_model()
        flops = self.task.train_flops_per_sample(model) if info.is_main else None
        model.to(self.device)
        self.strategy = build_strategy(model, info, replace(cfg.train, grad_accum_steps=self.grad_accum), cfg.optim,
                                       cfg.data.batch_size, self.bf16, grad_scaler(self.precision, info.device),
                                       lr_world_size=self.layout.virtual_ranks,
                                       load_universal=self._load_universal)
        self.model = self.strategy.model
        if info.is_main and self.strategy.ds_config is not None:
            atomic_write_json(self.run_dir / "deepspeed_config.json", self.strategy.ds_config)
        # Under fp16 evaluation runs in fp32, as the published fine-tuning's validation and test did.
        self.evaluator = Evaluator(self.strategy, info, self.bf16,
                                   batch_size=cfg.data.eval_batch_size or cfg.data.batch_size,
                                   # evaluation sets are small or read once: few workers suffice
                                   num_workers=min(cfg.data.num_workers, 2),
                                   stop_signals=list(cfg.train.stop_signals), stop=self.stop.flag)
        return flops

    def _resume(self, latest: Path | None) -> dict[str, Any] | None:
        """Loads everything from `latest` but the RNG states (returned, to restore just before the first step)."""
        cfg, info = self.cfg, self.info
        if latest is None:
            # Ranks share the model init (seeded before) but not their dropout/augmentation streams.
            self._seed_all(cfg.train.seed + 7919 * info.global_rank)
            return None
        resumed = self.checkpoints.load(latest, self.strategy, cfg.train.strategy)
        self.task.load_state_dict(resumed.trainer.get("task", {}))
        self.stop.load_state_dict(resumed.trainer.get("stop", {}))
        self.last_loss = resumed.trainer.get("last_loss")
        self.losses.load_state_dict(resumed.trainer.get("loss_window"))
        self.step = checkpoint_step(latest)
        self.stop.start(self.step)
        if self._legacy_position:
            # Written before data layouts, on this process count: the stream goes on from the rank file's position.
            consumed = (resumed.rank["samples_consumed"] if resumed.rank is not None
                        else self.step * self.layout.grad_accum * self.layout.micro_batch)
            self.layout = replace(self.layout, from_sample=int(consumed))
        if resumed.rank is not None:
            return resumed.rank["rng"]
        # Another number of processes: the data order and augmentation follow the run's layout, but each process's
        # own random streams (dropout, anything drawn from the global RNGs) cannot be carried over; say so.
        if not self._warned:  # (a checkpoint from before layouts has warned already)
            log.warning("resuming %s written by %s processes with %d: process-global random streams (e.g. "
                        "dropout) restart at step %d; the data order and augmentation are kept",
                        latest.name, resumed.trainer.get("world_size"), info.world_size, resumed.step)
        self._seed_all(cfg.train.seed + 7919 * info.global_rank + resumed.step)
        return None

    def _loader(self, datasets: Mapping[int, Dataset]):
        cfg = self.cfg
        loader, sampler = build_loader(
            datasets, self.layout, self.slots, self.info, cfg.data.num_workers, seed=cfg.train.seed,
            start_step=self.step, pin_memory=cfg.data.pin_memory, prefetch_factor=cfg.data.prefetch_factor,
            stop_signals=list(cfg.train.stop_signals))
        if self.stop.train_loss_stop is not None:
            # One epoch = one pass of a stream over its share; streams of different nodes may hold different
            # shares, so all take the shortest (every rank must close an epoch at the same step).
            steps = steps_per_epoch(sampler.per_rank, self.layout.micro_batch * self.layout.grad_accum)
            agreed = dist.all_reduce_(torch.tensor(-float(steps), device=self.device), "max")
            self.stop.set_epoch_steps(int(-agreed.item()))
            log.info("early stopping on the training loss: patience %d epochs of %d steps",
                     self.stop.train_loss_stop.patience, self.stop.epoch_steps)
        return loader

    def _describe_run(self, latest: Path | None, flops: float | None) -> float | None:
        """env.json, the hparams record, the opening log lines; opens metrics.jsonl and TensorBoard. Returns the
        peak TFLOP/s per device (None when unknown)."""
        cfg, info = self.cfg, self.info
        n_params = sum(p.numel() for p in self.model.parameters())
        precision = self.precision
        hosts = dist.all_gather_object(host_record(info.device))
        # fp16 and bf16 have the same tensor-core peak on the GPUs of the table.
        peak = peak_tflops(info.device, self.precision != "fp32", cfg.run.peak_tflops_per_device)
        if info.is_main:
            write_env_json(self.run_dir, info, hosts, {
                "model_parameters": n_params, "train_flops_per_sample": flops, "peak_tflops_per_device": peak,
                "precision": precision, "global_batch": self.world_batch, "data_layout": self.layout.to_dict(),
                "grad_accum_steps": self.grad_accum, "resumed_from": str(latest) if latest else None})
        self.metrics.open_writers(self.step)
        self.state.started(self.step, cfg.train.steps, info)
        self.metrics.hparams(self._hparams(n_params), self.task.hparam_metrics())
        log.info("%s: %s process(es) on %d node(s) [%s], %s on %s, %s, %.1f M parameters, global batch %d "
                 "(%d per process × %d accumulation × %d)", self.run_dir, info.world_size, info.num_nodes,
                 info.source, cfg.train.strategy, info.device, precision, n_params / 1e6,
                 self.world_batch, cfg.data.batch_size, self.grad_accum, info.world_size)
        if latest is not None:
            log.info("resuming from %s (step %d, %d samples consumed by each of the run's %d stream(s))", latest,
                     self.step, self.samples_consumed, self.layout.virtual_ranks)
        return peak

    def _hparams(self, n_params: int) -> dict[str, Any]:
        cfg, info = self.cfg, self.info
        return {"strategy": cfg.train.strategy, "precision": self.precision, "recipe": getattr(cfg, "recipe", "default"),
                "world_size": info.world_size, "num_nodes": info.num_nodes,
                "batch_size_per_process": cfg.data.batch_size, "global_batch": self.world_batch,
                "grad_accum_steps": self.grad_accum, "lr": cfg.optim.lr,
                "lr_scaling": cfg.optim.lr_scaling, "weight_decay": cfg.optim.weight_decay,
                "warmup_steps": cfg.optim.warmup_steps, "steps": cfg.train.steps,
                "seed": cfg.train.seed, "parameters": n_params, "task": self.task.name, **self.task.hparams()}

    # --------------------------------------------------------------------------------------------- one step
    def _train_step(self, data_iter: Iterator) -> StepOutput | TrainResult:
        """Micro-batches, one all-reduce, the optimizer step; a failed TrainResult on a non-finite loss or norm."""
        step_no = self.step + 1
        t_step = time.perf_counter()
        loss_sum, term_sums, kept, data_wait = self._accumulate(data_iter, step_no)
        loss, terms, stop_requested, bad = self._reduce(loss_sum, term_sums)
        if bad or not math.isfinite(loss):
            names = [k for k, v in terms.items() if not math.isfinite(v)] or ["total"]
            return self._fail(step_no, f"non-finite loss at step {step_no}: term(s) {', '.join(names)} "
                                       f"({', '.join(f'{k}={terms[k]}' for k in names if k in terms)})")
        lr_used = self.strategy.lr  # the scheduler moves on inside optimizer_step; log what this step used
        grad_norm = self.strategy.optimizer_step()
        if grad_norm is not None and not math.isfinite(grad_norm):
            return self._fail(step_no, f"non-finite gradient norm ({grad_norm}) at step {step_no} with a "
                                       f"finite loss ({loss:.6g}): lower optim.lr, or check the inputs")
        self.step = step_no
        self.last_loss = loss
        self.losses.add(loss, terms)
        self.throughput.add(time.perf_counter() - t_step, data_wait)
        return StepOutput(loss, terms, lr_used, grad_norm, stop_requested, kept)

    def _accumulate(self, data_iter: Iterator, step_no: int):
        """Forward and backward over this launch's micro-batches (self.grad_accum); returns (loss sum, term sums,
        the last micro-batch's (outputs, batch) when images are due, seconds spent waiting for data)."""
        cfg, info, strategy = self.cfg, self.info, self.strategy
        gas = self.grad_accum
        want_images = info.is_main and cfg.run.image_every_steps > 0 and step_no % cfg.run.image_every_steps == 0
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        term_sums: dict[str, Any] = {}
        kept, data_wait = None, 0.0
        for micro in range(gas):
            last = micro == gas - 1
            t_data = time.perf_counter()
            batch = to_device(next(data_iter), self.device)
            data_wait += time.perf_counter() - t_data
            ctx = StepContext(step_no, micro, info.global_rank, cfg.train.seed, self.device, *self.slots[micro])
            with strategy.no_sync(last):
                with autocast(self.device, self.precision):
                    outputs = self.task.forward(strategy.module, batch, ctx)
                    loss, terms = self.task.compute_loss(outputs, batch)
                strategy.backward(loss, last)
            loss_sum += loss.detach().double()
            for k, v in terms.items():
                term_sums[k] = term_sums.get(k, 0.0) + v.detach().double()
            if want_images and last:
                kept = (outputs, batch)
            del outputs, loss
        return loss_sum, term_sums, kept, data_wait

    def _reduce(self, loss_sum: torch.Tensor, term_sums: dict[str, Any]) -> tuple[float, dict[str, float], bool, bool]:
        """One collective per step: the losses for the log, "something is not finite", "a stop signal came".
        Returns (mean loss, mean terms, stop requested on any rank, non-finite on any rank)."""
        names = sorted(term_sums)
        vec = torch.stack([loss_sum] + [torch.as_tensor(term_sums[k], dtype=torch.float64, device=self.device)
                                        for k in names]
                          + [torch.tensor(float(self.stop.flag.requested), dtype=torch.float64, device=self.device)])
        bad_local = (~torch.isfinite(vec[:-1])).any().double().view(1)
        vec = torch.cat([vec, bad_local])
        # NaN + anything is NaN, so non-finite values also travel in the sums; the flag says *where*.
        dist.all_reduce_(vec, "sum")
        reduced = vec.cpu().tolist()
        n = self.grad_accum * self.info.world_size  # = the run's micro-batches per step
        terms = {k: reduced[1 + i] / n for i, k in enumerate(names)}
        return reduced[0] / n, terms, reduced[-2] > 0, reduced[-1] > 0

    def _log_step(self, out: StepOutput) -> None:
        step = self.step
        if step % self.cfg.run.log_every_steps == 0 or step == self.cfg.train.steps or out.stop_requested:
            self.metrics.log_step(step, self.cfg.train.steps, {
                "loss/total": out.loss, **{f"loss/{k}": v for k, v in out.terms.items()},
                **self.losses.mean(), "lr": out.lr, "grad_norm": out.grad_norm,  # None: not logged
                **self.throughput.scalars()})
            self.state.progress(step)
        if out.kept is not None:
            with torch.no_grad():
                self.metrics.images(step, self.task.images(*out.kept))

    def _evaluate(self) -> bool:
        """The task's evaluation when due; returns whether the task asks to stop (agreed by all ranks)."""
        every = self.cfg.train.eval_every_steps
        if not every or self.step % every:
            return False
        self.metrics.log_eval(self.step, self.task.evaluate(self.evaluator, self.step))
        flag = torch.tensor(float(self.task.should_stop()), device=self.device)
        return dist.all_reduce_(flag, "max").item() > 0

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int) -> Path:
        """Writes the checkpoint of `step` on all ranks (collective) and returns its folder."""
        t0 = time.perf_counter()
        final = self.checkpoints.save(
            step, self.strategy, payload={"step": step, "config": to_dict(self.cfg)},
            trainer_state={"step": step, "last_loss": self.last_loss, "loss_window": self.losses.state_dict(),
                           "task": self.task.state_dict(), "stop": self.stop.state_dict(),
                           "strategy": self.cfg.train.strategy, "world_size": self.info.world_size,
                           "data_layout": self.layout.to_dict(), "grad_accum_steps": self.grad_accum},
            rank_state={"rng": capture_rng_state(), "samples_consumed": self.samples_consumed,
                        "world_size": self.info.world_size, "step": step})
        log.info("saved checkpoint %s in %.1f s", final, time.perf_counter() - t0)
        self.state.checkpoint(step, final)
        return final

    # ------------------------------------------------------------------------------------------- endings
    def _stop(self, decision: Decision) -> TrainResult:
        if decision.status == "completed":
            if decision.stopped_early:
                log.info("stopping early at step %d: %s", self.step, decision.why or "the task asked to")
            return self._finish(self.step, saved=True, stopped_early=decision.stopped_early)
        log.info("stopping at step %d/%d after a checkpoint (%s); run again to continue", self.step,
                 self.cfg.train.steps, decision.why)
        self.metrics.flush()
        self.state.ended("preempted", self.step, self.final_loss, decision.why)
        return TrainResult("preempted", self.step, self.final_loss, self.run_dir, message=decision.why)

    def _finish(self, step: int, saved: bool, stopped_early: bool = False) -> TrainResult:
        if not saved:
            self.save_checkpoint(step)
        self.checkpoints.mark_done(step, self.final_loss, stopped_early=stopped_early)
        dist.barrier()
        log.info("training complete at step %d (final loss %s, the mean of the last %d steps)", step,
                 fmt4(self.final_loss), len(self.losses.steps))
        if not self.task.has_test:  # a task with a test is complete once its outputs are written (_test)
            self.state.ended("completed", step, self.final_loss)
        return TrainResult("completed", step, self.final_loss, self.run_dir,
                           message="stopped early" if stopped_early else "", stopped_early=stopped_early)

    def _fail(self, step: int, message: str) -> TrainResult:
        found = self.checkpoints.list()
        message = (f"{message}. Training stopped without saving; the newest checkpoint "
                   f"({found[-1][1].name if found else 'none'}) is the last good state.")
        log.error(message)
        self.metrics.flush()
        self.state.ended("failed", step, self.final_loss, message.split(". ")[0])
        dist.barrier()
        return TrainResult("failed", step, self.final_loss, self.run_dir, message=message)

    def _test(self, result: TrainResult) -> TrainResult:
        """The task's test after a completed run: scalars logged at the final step, then its outputs."""
        self.stop.install()  # a signal during a long test ends the launch cleanly
        try:
            scalars = self.task.test(self.evaluator, result.step) or {}
        except EvaluationInterrupted as e:
            log.info("stop signal during the test evaluation: run again to evaluate (training is complete)")
            self.state.ended("preempted", result.step, result.final_loss, "stop signal during the test")
            return TrainResult("preempted", result.step, result.final_loss, self.run_dir, message=str(e),
                               stopped_early=result.stopped_early)
        self.metrics.log_eval(result.step, scalars)
        self.metrics.flush()
        result.metrics = dict(scalars)
        self.task.on_complete(self.run_dir, result)
        self.state.ended("completed", result.step, result.final_loss)
        dist.barrier()
        return result


__all__ = ["Trainer", "Task", "TrainResult", "StepContext", "StepOutput", "resolve_precision"]
