"""The training engine: one loop for every job (pretraining, fine-tuning), driven by a Task.

    trainer = Trainer(cfg, task)      # cfg has sections train, optim, checkpoint, run, data (see config.py)
    result = trainer.fit()            # TrainResult(status="completed" | "preempted" | "failed", step, ...)

What `fit()` does, in order:
 1. returns at once if run.dir holds a DONE marker for at least train.steps;
 2. sets up the run folder (config.yaml, env.json, log.txt, TensorBoard, deepspeed_config.json);
 3. seeds, builds the model (identical on every rank), wraps it (DDP or ZeRO), and resumes from the newest
    complete checkpoint by step number: weights, optimizer, scheduler, task state, each rank's RNG states and
    data position, so the resumed run computes exactly what the uninterrupted one would have;
 4. per step: grad_accum_steps micro-batches (forward under bf16 autocast if asked, loss, backward), one
    all-reduce that carries the losses for logging, a non-finite flag and the stop-signal flag, then the optimizer
    step (clipping, schedule);
 5. logs scalars every run.log_every_steps, images every run.image_every_steps, runs the task's evaluate() every
    train.eval_every_steps, checkpoints every checkpoint.every_steps and at the end;
 6. stops cleanly: at train.steps (DONE marker, status "completed"), when the task asks to stop early
    ("completed"), on a stop signal or after train.max_steps_per_launch steps (checkpoint, "preempted"), on a
    NaN/Inf loss or gradient norm ("failed", naming the step and the term; nothing is saved, so the newest
    checkpoint is the last good one).
An exception on one rank propagates; the other ranks then fail in their next collective (the peer is gone) or
after train.dist_timeout_s, and under srun --kill-on-bad-exit / torchrun the job ends.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from phileo.config import save_config, to_dict
from phileo.fsutil import atomic_write_json, make_group_readable
from phileo.train import checkpoint as ckpt_io
from phileo.train import dist
from phileo.train.loader import build_loader, to_device
from phileo.train.metrics import (MetricsWriter, host_record, memory_stats, peak_tflops, setup_logging,
                                  teardown_logging, write_env_json)
from phileo.train.signals import StopFlag
from phileo.train.strategy import build_strategy

log = logging.getLogger("phileo.train")


@dataclass
class TrainResult:
    """How fit() ended. status: "completed" (train.steps reached or early stop; DONE written), "preempted"
    (stopped with a checkpoint by a signal or train.max_steps_per_launch: run again to continue), "failed"
    (non-finite loss or gradient; `message` says where). step: the last optimizer step taken; final_loss: the
    mean loss of that step over all ranks (None if no step was taken in this or an earlier launch)."""

    status: str
    step: int
    final_loss: float | None
    run_dir: Path
    message: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class StepContext:
    """What a task may need to know about the micro-batch it is computing."""

    step: int  # 1-based index of the optimizer step being computed
    micro_step: int  # 0 .. grad_accum_steps - 1
    global_rank: int
    seed: int
    device: torch.device

    def generator(self) -> torch.Generator:
        """A generator on the device seeded from (seed, step, micro_step, global_rank): augmentation drawn from
        it is the same in a resumed run and differs between ranks and steps."""
        mixed = np.random.SeedSequence([self.seed, self.step, self.micro_step, self.global_rank]).generate_state(2)
        g = torch.Generator(device=self.device)
        g.manual_seed(int(mixed[0]) << 32 | int(mixed[1]))
        return g


class Task:
    """What a job trains: subclass and override. The Trainer owns everything else.

    Required: build_model(), train_dataset(info) (called first), compute_loss(outputs, batch).
    Optional hooks (defaults shown in the methods): forward(), evaluate(), should_stop(), images(),
    train_flops_per_sample(), hparams(), state_dict()/load_state_dict() (saved in every checkpoint), on_save().
    `split` says how train_dataset() is shared among ranks: "world" (same dataset on every rank, all ranks split it)
    or "node" (the dataset already is this node's share; the node's local ranks split it).
    """

    split = "world"
    name = "task"  # a short name for logs and hparams

    def build_model(self) -> nn.Module:
        """The bare model, on CPU; called after train_dataset() and after seeding with train.seed on every rank
        (identical weights). Parameters left with requires_grad=False are neither synchronised nor optimised."""
        raise NotImplementedError

    def train_dataset(self, info: dist.DistInfo) -> Dataset:
        """The map-style training dataset of this rank's node (split="node") or of the whole job ("world")."""
        raise NotImplementedError

    def forward(self, model: nn.Module, batch: dict[str, Any], ctx: StepContext) -> Any:
        """Runs the (wrapped) model on a device batch; default model(batch["image"])."""
        return model(batch["image"])

    def compute_loss(self, outputs: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss to minimise, {term: 0-d tensor}) for one micro-batch; the term names must be the same on every
        rank and step (they are all-reduced together)."""
        raise NotImplementedError

    def evaluate(self, trainer: "Trainer", step: int) -> dict[str, float] | None:
        """Called on every rank every train.eval_every_steps; returns scalars to log (e.g. {"val/loss": ...}).

        Run the model as `trainer.strategy.module` (under ZeRO-3 only the engine gathers the weights), under
        torch.no_grad(), between trainer.model.eval() and trainer.model.train(); reduce metrics over ranks
        (phileo.train.dist.all_reduce_) so every rank returns the same values and should_stop() agrees."""
        return None

    def should_stop(self) -> bool:
        """Asked after evaluate(): True ends training early (e.g. early stopping on validation loss)."""
        return False

    def images(self, outputs: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """{tag: CHW image in [0, 1]} to log every run.image_every_steps (global rank 0)."""
        return {}

    def train_flops_per_sample(self, model: nn.Module) -> float | None:
        """FLOPs of one training sample (forward + backward), for MFU; None when unknown."""
        fn = getattr(model, "flops_per_sample", None)
        return 3.0 * float(fn()) if callable(fn) else None

    def hparams(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    def on_save(self, trainer: "Trainer", ckpt_dir: Path, step: int) -> None:
        """Called on every rank after a checkpoint folder is complete (e.g. to remember the best one)."""


def resolve_precision(precision: str, device: str) -> bool:
    """True for bf16. "auto" means bf16 on a GPU that supports it, fp32 otherwise."""
    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    return device.startswith("cuda") and torch.cuda.is_bf16_supported()


class Trainer:
    """Runs a Task under the job config `cfg` (sections train, optim, checkpoint, run, and data with batch_size,
    num_workers, pin_memory, prefetch_factor). `info`: the distributed layout; None = init_distributed() from the
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
        self.bf16 = resolve_precision(cfg.train.precision, self.info.device)
        self.model: nn.Module | None = None
        self.strategy: Any = None
        self.step = 0
        self.stop_flag = StopFlag(list(cfg.train.stop_signals))
        self.writer: MetricsWriter | None = None
        self.last_loss: float | None = None
        self.samples_consumed = 0

    # ----------------------------------------------------------------------------------------------- set-up
    def _setup_run_dir(self) -> None:
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            make_group_readable(self.run_dir, directory=True)
            for removed in ckpt_io.remove_stale_tmp(self.run_dir):
                log.info("deleted a half-written checkpoint from an earlier crash: %s", removed)
            save_config(self.cfg, self.run_dir / "config.yaml")
        dist.barrier()

    def _autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _seed_all(self, seed: int) -> None:
        import random

        torch.manual_seed(seed)
        np.random.seed(seed % 2 ** 32)
        random.seed(seed)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 CPU weights of the bare model (on every rank; collective under zero3, so call it on all ranks)."""
        return self.strategy.full_state_dict()

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int) -> Path:
        """Writes the checkpoint of `step` on all ranks (collective) and returns its folder."""
        final = ckpt_io.checkpoint_dir(self.run_dir, step)
        tmp = ckpt_io.tmp_checkpoint_dir(self.run_dir, step)
        t0 = time.perf_counter()
        if self.info.is_main:
            ckpt_io.prepare_tmp_dir(self.run_dir, step)
        dist.barrier()
        payload = {"step": step, "config": to_dict(self.cfg)}
        self.strategy.save(tmp, payload)
        ckpt_io.save_file({"rng": ckpt_io.capture_rng_state(), "samples_consumed": self.samples_consumed,
                           "world_size": self.info.world_size, "step": step},
                          ckpt_io.rank_state_path(tmp, self.info.global_rank))
        if self.info.is_main:
            ckpt_io.save_file({"step": step, "last_loss": self.last_loss, "task": self.task.state_dict(),
                               "strategy": self.cfg.train.strategy, "world_size": self.info.world_size},
                              tmp / "trainer.pt")
        ckpt_io.fsync_tree(tmp)
        dist.barrier()
        if self.info.is_main:
            ckpt_io.commit_tmp_dir(tmp, final)
            for old in ckpt_io.prune_checkpoints(self.run_dir, self.cfg.checkpoint.keep_last):
                log.info("deleted old checkpoint %s (checkpoint.keep_last=%d)", old.name,
                         self.cfg.checkpoint.keep_last)
        dist.barrier()
        log.info("saved checkpoint %s in %.1f s", final, time.perf_counter() - t0)
        self.task.on_save(self, final, step)
        return final

    def _resume(self, ckpt: Path) -> dict[str, Any] | None:
        """Loads everything but the RNG states (returned, to restore just before the first step)."""
        trainer_state = ckpt_io.load_file(ckpt / "trainer.pt", "trainer state")
        if trainer_state.get("strategy") != self.cfg.train.strategy:
            raise RuntimeError(
                f"{ckpt} was written with train.strategy={trainer_state.get('strategy')} but this run uses "
                f"train.strategy={self.cfg.train.strategy}; resume with the same strategy, or start a new run.dir")
        self.strategy.load(ckpt)
        self.task.load_state_dict(trainer_state.get("task", {}))
        self.last_loss = trainer_state.get("last_loss")
        step = int(trainer_state["step"])
        rank_file = ckpt_io.rank_state_path(ckpt, self.info.global_rank)
        if rank_file.is_file() and trainer_state.get("world_size") == self.info.world_size:
            rank_state = ckpt_io.load_file(rank_file, "rank state")
            self.samples_consumed = int(rank_state["samples_consumed"])
            return rank_state["rng"]
        # Another number of processes: the data order and RNG streams cannot continue exactly; go on from the
        # equivalent position so no sample is favoured, and say so.
        log.warning("resuming %s written by %s processes with %d: data order and random streams start afresh "
                    "at step %d (training continues, but not bit-identical to an uninterrupted run)",
                    ckpt.name, trainer_state.get("world_size"), self.info.world_size, step)
        self.samples_consumed = step * self.cfg.train.grad_accum_steps * self.cfg.data.batch_size
        self._seed_all(self.cfg.train.seed + 7919 * self.info.global_rank + step)
        return None

    # --------------------------------------------------------------------------------------------- the loop
    def fit(self) -> TrainResult:
        """Trains to train.steps (resuming if the run folder has checkpoints); see the module docstring."""
        cfg = self.cfg
        done = ckpt_io.read_done(self.run_dir)
        if done is not None and (int(done.get("step", 0)) >= cfg.train.steps or done.get("stopped_early")):
            self.step = int(done["step"])
            log.info("%s is already complete (DONE at step %d): nothing to do", self.run_dir, self.step)
            return TrainResult("completed", self.step, done.get("final_loss"), self.run_dir,
                               message="already complete")
        self._setup_run_dir()
        if done is not None and self.info.is_main:
            # train.steps was raised past a finished run: it is not finished any more until the new end.
            (self.run_dir / ckpt_io.DONE).unlink(missing_ok=True)
        handlers = setup_logging(self.run_dir, self.info.global_rank)
        try:
            return self._fit()
        except Exception:
            # Into log.txt too (rank 0), not just the job's stderr; the exception still ends this rank.
            log.exception("training failed on global rank %d at step %d", self.info.global_rank, self.step + 1)
            raise
        finally:
            self.stop_flag.restore()
            if self.writer is not None:
                self.writer.close()
            teardown_logging(handlers)

    def _fit(self) -> TrainResult:
        cfg, info = self.cfg, self.info
        latest = dist.broadcast_object(ckpt_io.latest_checkpoint(self.run_dir) if info.is_main else None)
        start_step = ckpt_io.checkpoint_step(latest) if latest is not None else 0

        # The dataset first: opening it is cheap, and a task may shape its model by what the data holds
        # (pretraining trains the auxiliary heads only when the shards carry their targets).
        dataset = self.task.train_dataset(info)
        self._seed_all(cfg.train.seed)
        model = self.task.build_model()
        flops = self.task.train_flops_per_sample(model) if info.is_main else None
        model.to(self.device)
        n_params = sum(p.numel() for p in model.parameters())
        self.strategy = build_strategy(model, info, cfg.train, cfg.optim, cfg.data.batch_size, self.bf16)
        self.model = self.strategy.model
        if info.is_main and self.strategy.ds_config is not None:
            atomic_write_json(self.run_dir / "deepspeed_config.json", self.strategy.ds_config)

        rng_state = None
        if latest is not None:
            rng_state = self._resume(Path(latest))
        else:
            # Ranks share the model init (seeded above) but not their dropout/augmentation streams.
            self._seed_all(cfg.train.seed + 7919 * info.global_rank)
        self.step = start_step

        loader, sampler = build_loader(
            dataset, info, cfg.data.batch_size, cfg.data.num_workers, seed=cfg.train.seed,
            start_sample=self.samples_consumed, split=self.task.split,
            pin_memory=getattr(cfg.data, "pin_memory", True), prefetch_factor=getattr(cfg.data, "prefetch_factor", 2),
            stop_signals=list(cfg.train.stop_signals))

        hosts = dist.all_gather_object(host_record(info.device))
        world_batch = cfg.data.batch_size * cfg.train.grad_accum_steps * info.world_size
        peak = peak_tflops(info.device, self.bf16, cfg.run.peak_tflops_per_device)
        if info.is_main:
            write_env_json(self.run_dir, info, hosts, {
                "model_parameters": n_params, "train_flops_per_sample": flops, "peak_tflops_per_device": peak,
                "precision": "bf16" if self.bf16 else "fp32", "global_batch": world_batch,
                "resumed_from": str(latest) if latest else None})
        self.writer = MetricsWriter(self.run_dir, info.is_main, cfg.run.tensorboard, start_step)
        self.writer.hparams({"strategy": cfg.train.strategy, "precision": "bf16" if self.bf16 else "fp32",
                             "world_size": info.world_size, "num_nodes": info.num_nodes,
                             "batch_size_per_process": cfg.data.batch_size, "global_batch": world_batch,
                             "grad_accum_steps": cfg.train.grad_accum_steps, "lr": cfg.optim.lr,
                             "lr_scaling": cfg.optim.lr_scaling, "weight_decay": cfg.optim.weight_decay,
                             "warmup_steps": cfg.optim.warmup_steps, "steps": cfg.train.steps,
                             "seed": cfg.train.seed, "parameters": n_params, "task": self.task.name,
                             **self.task.hparams()},
                            ["loss/total"])
        log.info("%s: %s process(es) on %d node(s) [%s], %s on %s, %s, %.1f M parameters, global batch %d "
                 "(%d per process × %d accumulation × %d)", self.run_dir, info.world_size, info.num_nodes,
                 info.source, cfg.train.strategy, info.device, "bf16" if self.bf16 else "fp32", n_params / 1e6,
                 world_batch, cfg.data.batch_size, cfg.train.grad_accum_steps, info.world_size)
        if latest is not None:
            log.info("resuming from %s (step %d, %d samples consumed on rank 0)", latest, start_step,
                     self.samples_consumed)
        if start_step >= cfg.train.steps:
            return self._finish(start_step, saved=True)

        self.stop_flag.install()  # before the loader forks its workers, so they inherit our handlers, not SIG_DFL
        data_iter = iter(loader)
        if rng_state is not None:
            ckpt_io.restore_rng_state(rng_state)  # last, so nothing above shifts the restored streams
        try:
            return self._loop(data_iter, start_step, flops, peak)
        finally:
            # Stop the workers now rather than whenever an exception's traceback lets go of the iterator.
            shutdown = getattr(data_iter, "_shutdown_workers", None)
            if callable(shutdown):
                shutdown()

    def _loop(self, data_iter: Iterator, start_step: int, flops: float | None, peak: float | None) -> TrainResult:
        cfg, info, strategy = self.cfg, self.info, self.strategy
        gas = cfg.train.grad_accum_steps
        batch_size = cfg.data.batch_size
        term_names: list[str] | None = None
        window = {"steps": 0, "time": 0.0, "data": 0.0}
        last_saved = start_step
        step = start_step
        total = cfg.train.steps
        while step < total:
            step_no = step + 1
            t_step = time.perf_counter()
            data_wait = 0.0
            loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
            term_sums: dict[str, torch.Tensor] = {}
            want_images = (info.is_main and cfg.run.image_every_steps > 0
                           and step_no % cfg.run.image_every_steps == 0)
            kept: tuple[Any, Any] | None = None
            for micro in range(gas):
                last = micro == gas - 1
                t_data = time.perf_counter()
                batch = to_device(next(data_iter), self.device)
                data_wait += time.perf_counter() - t_data
                ctx = StepContext(step_no, micro, info.global_rank, cfg.train.seed, self.device)
                with strategy.no_sync(last):
                    with self._autocast():
                        outputs = self.task.forward(strategy.module, batch, ctx)
                        loss, terms = self.task.compute_loss(outputs, batch)
                    strategy.backward(loss, last)
                loss_sum += loss.detach().double()
                for k, v in terms.items():
                    term_sums[k] = term_sums.get(k, 0.0) + v.detach().double()
                if want_images and last:
                    kept = (outputs, batch)
                del outputs, loss
            self.samples_consumed += gas * batch_size

            # One collective per step: losses for the log, "something is not finite", "a stop signal came".
            if term_names is None:
                term_names = sorted(term_sums)
            vec = torch.stack([loss_sum] + [torch.as_tensor(term_sums[k], dtype=torch.float64, device=self.device)
                                            for k in term_names]
                              + [torch.tensor(float(self.stop_flag.requested), dtype=torch.float64,
                                              device=self.device)])
            bad_local = (~torch.isfinite(vec[:-1])).any().double().view(1)
            vec = torch.cat([vec, bad_local])
            # NaN + anything is NaN, so non-finite values also travel in the sums; the flag says *where*.
            dist.all_reduce_(vec, "sum")
            reduced = vec.cpu().tolist()
            mean_loss = reduced[0] / (gas * info.world_size)
            term_means = {k: reduced[1 + i] / (gas * info.world_size) for i, k in enumerate(term_names)}
            stop_requested = reduced[-2] > 0
            if reduced[-1] > 0 or not math.isfinite(mean_loss):
                bad = [k for k, v in term_means.items() if not math.isfinite(v)] or ["total"]
                return self._fail(step_no, f"non-finite loss at step {step_no}: term(s) {', '.join(bad)} "
                                           f"({', '.join(f'{k}={term_means[k]}' for k in bad if k in term_means)})")

            lr_used = strategy.lr  # the scheduler moves on inside optimizer_step; log what this step used
            grad_norm = strategy.optimizer_step()
            if grad_norm is not None and not math.isfinite(grad_norm):
                return self._fail(step_no, f"non-finite gradient norm ({grad_norm}) at step {step_no} with a "
                                           f"finite loss ({mean_loss:.6g}): lower optim.lr, or check the inputs")
            step = self.step = step_no
            self.last_loss = mean_loss
            step_time = time.perf_counter() - t_step
            window["steps"] += 1
            window["time"] += step_time
            window["data"] += data_wait

            if step % cfg.run.log_every_steps == 0 or step == total or stop_requested:
                self._log_step(step, mean_loss, term_means, lr_used, grad_norm, window, flops, peak)
                window = {"steps": 0, "time": 0.0, "data": 0.0}
            if kept is not None:
                with torch.no_grad():
                    self.writer.images(step, self.task.images(*kept))
                kept = None

            stop_early = False
            if cfg.train.eval_every_steps and step % cfg.train.eval_every_steps == 0:
                metrics = self.task.evaluate(self, step)
                if metrics:
                    self.writer.scalars(step, metrics)
                    log.info("step %d: %s", step, ", ".join(f"{k} {v:.6g}" for k, v in metrics.items()))
                flag = torch.tensor(float(self.task.should_stop()), device=self.device)
                stop_early = dist.all_reduce_(flag, "max").item() > 0

            launch_limit = (cfg.train.max_steps_per_launch > 0
                            and step - start_step >= cfg.train.max_steps_per_launch and step < total)
            if step % cfg.checkpoint.every_steps == 0 or step == total or stop_requested or launch_limit or stop_early:
                self.save_checkpoint(step)
                last_saved = step
            if stop_early:
                log.info("the task asked to stop early at step %d", step)
                return self._finish(step, saved=True, stopped_early=True)
            if (stop_requested and step < total) or launch_limit:
                why = (f"stop signal {self.stop_flag.signal_name or '(on another rank)'}" if stop_requested
                       else f"train.max_steps_per_launch={cfg.train.max_steps_per_launch}")
                log.info("stopping at step %d/%d after a checkpoint (%s); run again to continue", step, total, why)
                self.writer.flush()
                return TrainResult("preempted", step, self.last_loss, self.run_dir, message=why)
        return self._finish(step, saved=last_saved == step)

    def _finish(self, step: int, saved: bool, stopped_early: bool = False) -> TrainResult:
        if not saved:
            self.save_checkpoint(step)
        if self.info.is_main:
            ckpt_io.write_done(self.run_dir, step, self.last_loss, stopped_early=stopped_early)
        dist.barrier()
        log.info("training complete at step %d (final loss %s)", step,
                 f"{self.last_loss:.6g}" if self.last_loss is not None else "n/a")
        return TrainResult("completed", step, self.last_loss, self.run_dir,
                           message="stopped early" if stopped_early else "")

    def _fail(self, step: int, message: str) -> TrainResult:
        latest = ckpt_io.latest_checkpoint(self.run_dir)
        message = (f"{message}. Training stopped without saving; the newest checkpoint "
                   f"({latest.name if latest else 'none'}) is the last good state.")
        log.error(message)
        if self.writer is not None:
            self.writer.flush()
        dist.barrier()
        return TrainResult("failed", step, self.last_loss, self.run_dir, message=message)

    def _log_step(self, step: int, loss: float, terms: dict[str, float], lr: float, grad_norm: float | None,
                  window: dict,
                  flops: float | None, peak: float | None) -> None:
        info, cfg = self.info, self.cfg
        steps, secs = max(window["steps"], 1), max(window["time"], 1e-9)
        world_batch = cfg.data.batch_size * cfg.train.grad_accum_steps * info.world_size
        samples_per_s = world_batch * steps / secs
        per_gpu = samples_per_s / info.world_size
        scalars: dict[str, float] = {"loss/total": loss, **{f"loss/{k}": v for k, v in terms.items()},
                                     "lr": lr, "grad_norm": grad_norm,  # None: not logged
                                     "perf/samples_per_s": samples_per_s, "perf/samples_per_s_per_gpu": per_gpu,
                                     "perf/step_time_s": secs / steps, "perf/data_wait_s": window["data"] / steps,
                                     "perf/data_wait_frac": window["data"] / secs}
        if flops and peak:
            scalars["perf/mfu"] = flops * per_gpu / (peak * 1e12)
        scalars.update(memory_stats(info.device))
        if info.is_main:
            self.writer.scalars(step, scalars)
            mem = scalars.get("mem/gpu_max_allocated_gib", scalars["mem/host_rss_peak_gib"])
            log.info("step %d/%d | loss %.6g | lr %.3g | grad_norm %s | %.1f samples/s (%.1f per process) | "
                     "data wait %.0f%% | mem %.2f GiB%s", step, cfg.train.steps, loss, scalars["lr"],
                     "n/a" if grad_norm is None else f"{grad_norm:.3g}",
                     samples_per_s, per_gpu, 100 * scalars["perf/data_wait_frac"], mem,
                     f" | MFU {100 * scalars['perf/mfu']:.1f}%" if "perf/mfu" in scalars else "")


__all__ = ["Trainer", "Task", "TrainResult", "StepContext", "resolve_precision"]
