"""The DeepSpeed config, generated from our one job config (never written by hand) and saved with the run.

What we keep for ourselves rather than hand to DeepSpeed: the optimizer and LR schedule (torch AdamW and our
warm-up + cosine, passed in as client objects, so DDP and ZeRO run the same update and CPU tests never compile
DeepSpeed's fused/CPU Adam), the data loader, logging and checkpoint layout.
"""

from __future__ import annotations

from typing import Any

from phileo.train.config import TrainConfig

ZERO_STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}


def zero_stage(strategy: str) -> int:
    """1, 2 or 3 for "zero1".."zero3"; refuses "ddp" (not a DeepSpeed strategy)."""
    try:
        return ZERO_STAGES[strategy]
    except KeyError:
        raise ValueError(f"strategy {strategy!r} is not a ZeRO strategy ({', '.join(ZERO_STAGES)})") from None


def make_deepspeed_config(train: TrainConfig, micro_batch_size: int, world_size: int, bf16: bool,
                          load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config dict for `train.strategy` (zero1|zero2|zero3).

    micro_batch_size is per process (data.batch_size); bf16 is the resolved precision (DeepSpeed's bf16 mode:
    bf16 weights and activations, fp32 master weights and optimizer state inside ZeRO). Gradient clipping and
    accumulation are DeepSpeed's to do (it owns the gradients); train.offload adds ZeRO-Offload.
    load_universal: this launch resumes a checkpoint written by another number of processes, through DeepSpeed's
    universal checkpoint (checkpoint.load_universal).
    """
    stage = zero_stage(train.strategy)
    zero: dict[str, Any] = {
        "stage": stage,
        # Overlapping communication with backward is what ZeRO is for on GPUs; contiguous gradients avoid
        # fragmentation at the price of one copy.
        "overlap_comm": True,
        "contiguous_gradients": True,
    }
    if stage == 3:
        # No extra gather of the 16-bit weights on save: model.pt is consolidated from the fp32 partitions.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
        # DeepSpeed's "memory-efficient linear" replaces torch.nn.functional.linear for the whole process, for
        # good (its own log says so): later runs in the same process (tests, in-process sweeps) would compute
        # differently. It saves holding gathered Linear weights until backward, a few hundred MB for our largest
        # models; we keep torch's linear.
        zero["memory_efficient_linear"] = False
    if train.offload in ("optimizer", "optimizer_and_params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if train.offload == "optimizer_and_params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "train_batch_size": micro_batch_size * train.grad_accum_steps * world_size,
        "gradient_clipping": float(train.grad_clip_norm),
        "zero_optimization": zero,
        # Our AdamW is torch's, handed over as a client optimizer: allowed, and (with offload) not forced onto
        # DeepSpeed's CPU Adam since build_optimizer already gives that one.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        # We log ourselves; DeepSpeed's own step printing and timers would only add noise and syncs.
        "steps_per_print": 2 ** 31 - 1,
        "wall_clock_breakdown": False,
        # Tags are ours ("state"); validating them across ranks costs an all-gather per save for nothing.
        "checkpoint": {"tag_validation": "Ignore"},
    }
    if load_universal:
        config["checkpoint"]["load_universal"] = True
    if bf16:
        config["bf16"] = {"enabled": True}
        # Accumulate gradients across micro-batches in fp32, not bf16 (7 mantissa bits lose small updates).
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


__all__ = ["make_deepspeed_config", "zero_stage", "ZERO_STAGES"]
