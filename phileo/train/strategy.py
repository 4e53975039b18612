"""How the model is replicated or sharded: plain DDP, or DeepSpeed ZeRO 1/2/3 (applied in one place).

Both strategies answer the same small interface the Trainer drives:

    module                the callable to run forward (DDP wrapper / DeepSpeed engine / the bare model alone)
    model                 the bare nn.Module (its state dict has no "module." prefix)
    micro_step(loss, last) backward of one micro-batch (loss already averaged over that micro-batch)
    optimizer_step()      clip, step, schedule at the end of a full step; returns the global grad norm
    lr                    current learning rate
    save(dir, ...) / load(dir)   the strategy's part of a checkpoint folder (see phileo.train.checkpoint)

Gradient semantics are the same in both: the update uses the mean gradient over all micro-batches of all ranks.
`lr_world_size` is the world size optim.lr_scaling scales by: the run's number of data streams (its world size at
the first start), so the LR does not move when a run resumes on another number of processes.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from phileo.train import checkpoint as ckpt_io
from phileo.train import dist
from phileo.train.config import OptimConfig, TrainConfig
from phileo.train.deepspeed_config import make_deepspeed_config, zero_stage
from phileo.train.optim import build_optimizer, build_scheduler, lr_of

log = logging.getLogger("phileo.train")


class DDPStrategy:
    """torch DistributedDataParallel (or the bare model when there is only one process)."""

    name = "ddp"

    def __init__(self, model: nn.Module, info: dist.DistInfo, train: TrainConfig, optim: OptimConfig,
                 scaler: torch.amp.GradScaler | None = None, lr_world_size: int | None = None):
        self.model = model
        self.info = info
        self.train_cfg = train
        # fp16's dynamic loss scaler (phileo.train.precision.grad_scaler), None in fp32/bf16. A step whose
        # gradients overflow is skipped and the scale lowered, as torch.amp does; such steps are counted.
        self.scaler = scaler
        self.skipped_steps = 0
        self.optimizer = build_optimizer(model, optim, lr_world_size or info.world_size)
        self.scheduler = build_scheduler(self.optimizer, optim, train.steps)
        if info.distributed:
            device_ids = [torch.device(info.device).index] if info.device.startswith("cuda") else None
            # find_unused_parameters stays off: every PhilEO output feeds the loss, and the search costs a
            # graph traversal per step. Frozen parameters (ViT pos_embed) are not in DDP's buckets anyway.
            self.module: nn.Module = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        else:
            self.module = model
        self.ds_config: dict[str, Any] | None = None

    def no_sync(self, last_micro: bool):
        """Skips the gradient all-reduce on all but the last micro-batch of a step."""
        if last_micro or not isinstance(self.module, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.module.no_sync()

    def backward(self, loss: torch.Tensor, last_micro: bool) -> None:
        # DDP averages over ranks; dividing by the accumulation count averages over micro-batches.
        loss = loss / self.train_cfg.grad_accum_steps
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def optimizer_step(self) -> float | None:
        """Clips, steps the optimizer and the schedule; returns the global gradient norm before clipping. A
        non-finite norm is returned without stepping, so the weights stay those of the last good step. With an
        fp16 scaler the norm is that of the unscaled gradients, and an overflow is not an error: the step is
        skipped (the scaler lowers its scale, the schedule moves on) and None is returned."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.train_cfg.grad_clip_norm if self.train_cfg.grad_clip_norm > 0 else float("inf")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if self.scaler is not None:
            return self._scaled_step(grad_norm)
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return grad_norm
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _scaled_step(self, grad_norm: float) -> float | None:
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)  # skips optimizer.step() when unscale_ found inf/NaN
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if math.isfinite(grad_norm):
            return grad_norm
        self.skipped_steps += 1
        log.warning("fp16 gradient overflow at loss scale %g: step skipped, scale lowered to %g (%d skipped so far)",
                    scale, self.scaler.get_scale(), self.skipped_steps)
        return None

    @property
    def lr(self) -> float:
        return lr_of(self.optimizer)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The bare model's weights as fp32 CPU tensors (identical on every rank)."""
        return {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone()
                for k, v in self.model.state_dict().items()}

    def save(self, ckpt: Path, model_payload: dict[str, Any]) -> None:
        """Writes model.pt and optimizer.pt (global rank 0 only: DDP state is replicated)."""
        if self.info.is_main:
            ckpt_io.save_file({"model": self.full_state_dict(), **model_payload}, ckpt / "model.pt")
            state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
            if self.scaler is not None:
                state["scaler"] = self.scaler.state_dict()
            ckpt_io.save_file(state, ckpt / "optimizer.pt")

    def load(self, ckpt: Path) -> None:
        state = ckpt_io.load_file(ckpt / "model.pt", "model checkpoint")
        self.model.load_state_dict(state["model"])
        if not (ckpt / "optimizer.pt").is_file():
            raise FileNotFoundError(
                f"{ckpt} has no optimizer.pt: it was not written by train.strategy=ddp (a ZeRO run keeps its "
                f"optimizer under deepspeed/). Resume with the strategy it was written with, or start a new run "
                f"folder initialised from {ckpt / 'model.pt'}")
        opt = ckpt_io.load_file(ckpt / "optimizer.pt", "optimizer state")
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        if self.scaler is not None and "scaler" in opt:
            self.scaler.load_state_dict(opt["scaler"])


def _import_deepspeed():
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed
    import deepspeed.ops

    # DeepSpeed's CPU accelerator compiles a shared-memory collective op (~2 min on 2 cores) the first time a
    # process group is set up; gloo does the same job here. `__compatible_ops__` is an internal switch (checked
    # with deepspeed 0.19.8, the version constraints.txt pins; without the switch the run is only slower to start).
    if getattr(deepspeed.ops, "__compatible_ops__", None) is not None:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed 0.19 still calls the collectives torch 2.13 renamed; one warning per call would flood the log.
    warnings.filterwarnings(
        "ignore", category=FutureWarning,
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
    return deepspeed


class DeepSpeedStrategy:
    """DeepSpeed ZeRO stage 1, 2 or 3 with our AdamW and schedule handed over as client objects.

    load_universal: the checkpoint to resume was written by another number of processes; load() then converts
    DeepSpeed's sharded state to its universal checkpoint (deepspeed.checkpoint.ds_to_universal) in a scratch
    folder beside the checkpoint and loads that (DeepSpeed's config gets checkpoint.load_universal)."""

    def __init__(self, model: nn.Module, info: dist.DistInfo, train: TrainConfig, optim: OptimConfig,
                 micro_batch_size: int, bf16: bool, lr_world_size: int | None = None, load_universal: bool = False):
        deepspeed = _import_deepspeed()
        self.name = train.strategy
        self.stage = zero_stage(train.strategy)
        self.info = info
        self.train_cfg = train
        self.load_universal = load_universal
        self.ds_config = make_deepspeed_config(train, micro_batch_size, info.world_size, bf16,
                                               load_universal=load_universal)
        optimizer = build_optimizer(model, optim, lr_world_size or info.world_size,
                                    cpu_offload=train.offload != "none")
        scheduler = build_scheduler(optimizer, optim, train.steps)
        engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=False)
        self.engine = engine
        self.module = engine
        self.model = engine.module
        self._grad_norm = 0.0

    def no_sync(self, last_micro: bool):
        # DeepSpeed reduces at the accumulation boundary on its own.
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last_micro: bool) -> None:
        # engine.backward divides by gradient_accumulation_steps itself.
        self.engine.backward(loss)
        if not last_micro:
            # Not a boundary: DeepSpeed's step only advances its micro-step counter here.
            self.engine.step()

    def optimizer_step(self) -> float | None:
        """DeepSpeed's step at the accumulation boundary (clipping inside); returns its global gradient norm
        before clipping, or None when it did not compute one."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The bare model's weights (collective under ZeRO-3: call on every rank). fp32 CPU tensors; under bf16
        these are the bf16 working weights cast up; model.pt in a checkpoint holds the exact fp32 masters."""
        if self.stage == 3:
            import deepspeed

            params = list(self.model.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone()
                        for k, v in self.model.state_dict().items()}
        return {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone()
                for k, v in self.model.state_dict().items()}

    def save(self, ckpt: Path, model_payload: dict[str, Any]) -> None:
        """DeepSpeed's sharded checkpoint (all ranks), then model.pt on rank 0: the module's full state (frozen
        parameters and buffers included; gathered under ZeRO-3) with every trained parameter replaced by its
        exact fp32 master weights, which live in the optimizer partitions of all ranks."""
        ds_dir = ckpt / "deepspeed"
        module_state = self.full_state_dict()  # collective under zero3: before the rank-0-only part
        self.engine.save_checkpoint(str(ds_dir), tag="state", save_latest=True)
        dist.barrier()
        if self.info.is_main:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            # The same routine as DeepSpeed's zero_to_fp32.py script. It leaves out frozen parameters under
            # ZeRO-1 (DeepSpeed saves their shapes only from stage 2 on): the module state fills those in.
            if any((ds_dir / "state").glob(_BF16_ZERO_OPTIM)):
                masters = bf16_zero_masters(ds_dir / "state")
            else:
                with _quiet_stdout():
                    masters = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag="state")
            unknown = sorted(set(masters) - set(module_state))
            if unknown:
                raise RuntimeError(f"DeepSpeed's checkpoint in {ds_dir} has parameters the model does not: "
                                   f"{unknown[:5]}")
            state = {k: masters[k].float() if k in masters else v for k, v in module_state.items()}
            ckpt_io.save_file({"model": state, **model_payload}, ckpt / "model.pt")

    def load(self, ckpt: Path) -> None:
        """Loads DeepSpeed's checkpoint of `ckpt` (collective): directly when written by this number of processes,
        else through its universal form (load_universal)."""
        ds_dir = ckpt / "deepspeed"
        if not (ds_dir / "state").is_dir():
            raise FileNotFoundError(
                f"{ckpt} has no deepspeed/state/: it was not written by a ZeRO strategy (a ddp run keeps "
                f"optimizer.pt). Resume with the strategy it was written with, or start a new run folder "
                f"initialised from {ckpt / 'model.pt'}")
        if self.load_universal:
            self._load_universal(ckpt)
            return
        path, _ = self.engine.load_checkpoint(str(ds_dir), tag="state", load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load its checkpoint from {ds_dir} (see its log above)")

    def _load_universal(self, ckpt: Path) -> None:
        """Global rank 0 converts deepspeed/state/ into DeepSpeed's universal checkpoint (per parameter: fp32
        master, Adam moments, step) in a scratch folder beside the checkpoint, every rank loads its new
        partitions from it, and rank 0 deletes it. Exact: the same fp32 state, partitioned anew."""
        scratch = ckpt_io.scratch_dir(ckpt, "universal")
        problem = None
        if self.info.is_main:
            t0 = time.perf_counter()
            try:
                _to_universal(ckpt / "deepspeed" / "state", scratch / "state")
                log.info("converted %s's ZeRO state to DeepSpeed's universal checkpoint in %.1f s (it was written "
                         "by another number of processes)", ckpt.name, time.perf_counter() - t0)
            except Exception as e:  # every rank must learn of it, or the others wait in the broadcast
                shutil.rmtree(scratch, ignore_errors=True)
                problem = (f"cannot convert the ZeRO checkpoint {ckpt / 'deepspeed'} to DeepSpeed's universal form "
                           f"to resume it on {self.info.world_size} process(es) ({type(e).__name__}: {e}); "
                           f"resume with the number of processes that wrote it")
        problem = dist.broadcast_object(problem)
        if problem:
            raise RuntimeError(problem)
        inner = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)  # our torch AdamW
        built = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in inner.param_groups]
        try:
            path, _ = self.engine.load_checkpoint(str(scratch), tag="state", load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {scratch} (see its log)")
            if self.stage == 3:
                _repair_stage3_universal_load(inner, built)
        finally:
            dist.barrier()
            if self.info.is_main:
                shutil.rmtree(scratch, ignore_errors=True)


def _repair_stage3_universal_load(optimizer: torch.optim.Optimizer, built: list[dict[str, Any]]) -> None:
    """Undoes two slips of DeepSpeed 0.19.8's ZeRO-3 universal load (stage3.py,
    load_hp_checkpoint_state_from_checkpoint_dir_stage3) with more than one parameter group, as ours are (decayed,
    not decayed): it gives every group the hyperparameters of group 0 (the biases and norms would be decayed), and
    one `step` tensor to every group's state (AdamW increments it in place, once per group and step). The
    groups get back what this launch built (weight decay, betas, eps: the config's; the LR stays the loaded
    schedule's, the same for every group), and each state its own step."""
    for group, hyper in zip(optimizer.param_groups, built):
        group.update(hyper)
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _to_universal(ds_state: Path, out: Path) -> None:
    """deepspeed.checkpoint.ds_to_universal on one DeepSpeed checkpoint tag folder, in this process (no worker
    pool), its progress output kept out of the job's log."""
    from deepspeed.checkpoint import ds_to_universal

    if out.parent.exists():
        shutil.rmtree(out.parent)
    args = argparse.Namespace(input_folder=str(ds_state), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              # client optimizers leave out the version tag the converter asks for
                              inject_missing_state=True)
    with _quiet_stdout():
        ds_to_universal.main(args)


# ZeRO-1 with bf16 weights and fp32 gradient accumulation (our bf16 config) runs DeepSpeed's BF16_Optimizer, whose
# checkpoint files zero_to_fp32 refuses ("is not a zero checkpoint").
_BF16_ZERO_OPTIM = "bf16_zero_pp_rank_*_mp_rank_*_optim_states.pt"


def bf16_zero_masters(state_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a BF16_Optimizer checkpoint folder (DeepSpeed's `bf16_zero_*` files): per
    parameter group, the ranks' flat fp32 partitions joined in rank order (the padding sits at the end), cut
    into the trained parameters by the shapes the model states file records, in order. Refuses a folder whose
    partitions are shorter than its parameters."""
    def rank_of(f: Path) -> int:
        return int(f.name.split("_pp_rank_")[1].split("_")[0])

    files = sorted(state_dir.glob(_BF16_ZERO_OPTIM), key=rank_of)
    try:  # DeepSpeed's own keys (checked with 0.19.8, the version constraints.txt pins)
        parts = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
                 ["single_partition_of_fp32_groups"] for f in files]
        model_states = next(state_dir.glob("mp_rank_*_model_states.pt"))
        shapes = torch.load(model_states, map_location="cpu", weights_only=False)["param_shapes"]
    except (KeyError, StopIteration) as e:
        import deepspeed

        raise RuntimeError(f"{state_dir}: not the BF16_Optimizer checkpoint layout of DeepSpeed 0.19 (missing "
                           f"{e}); DeepSpeed {deepspeed.__version__} is installed: use the version "
                           f"constraints.txt pins") from None
    masters: dict[str, torch.Tensor] = {}
    for g, group in enumerate(shapes):
        flat = torch.cat([p[g].float() for p in parts])
        offset = 0
        for name, shape in group.items():
            n = math.prod(shape)
            if offset + n > flat.numel():
                raise RuntimeError(f"{state_dir}: the fp32 partitions of parameter group {g} hold {flat.numel()} "
                                   f"values, fewer than its parameters need ({name} ends at {offset + n})")
            masters[name] = flat[offset:offset + n].view(tuple(shape)).clone()
            offset += n
    return masters


@contextlib.contextmanager
def _quiet_stdout():
    # zero_to_fp32 prints progress lines and bars on every save; keep the job's output for our log lines.
    # Errors still surface: they are exceptions, not prints.
    import io
    import sys

    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = io.StringIO()
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


def build_strategy(model: nn.Module, info: dist.DistInfo, train: TrainConfig, optim: OptimConfig,
                   micro_batch_size: int, bf16: bool, scaler: torch.amp.GradScaler | None = None,
                   lr_world_size: int | None = None, load_universal: bool = False):
    """DDPStrategy for train.strategy=ddp, DeepSpeedStrategy for zero1/zero2/zero3. `model` must already be on
    info.device with identical initial weights on every rank (seed before building it). `train.grad_accum_steps`
    is this launch's (the engine's, which keeps the run's global batch). `scaler`: fp16's gradient scaler (ddp
    only; TrainConfig refuses fp16 with ZeRO). `lr_world_size`: see the module docstring (default: the world
    size). `load_universal`: ZeRO only, the checkpoint to load was written by another number of processes."""
    if train.strategy == "ddp":
        return DDPStrategy(model, info, train, optim, scaler, lr_world_size)
    if scaler is not None:
        raise ValueError(f"train.precision=fp16 needs train.strategy=ddp, not {train.strategy}")
    return DeepSpeedStrategy(model, info, train, optim, micro_batch_size, bf16, lr_world_size, load_universal)


__all__ = ["DDPStrategy", "DeepSpeedStrategy", "build_strategy"]
