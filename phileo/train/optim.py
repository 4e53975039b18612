"""AdamW and its learning-rate schedule (linear or geometric warm-up, then cosine decay), both by optimizer step."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn

from phileo.train.config import OptimConfig

# Names of parameters exempt from weight decay besides every tensor with fewer than 2 dimensions (see param_groups).
_NO_DECAY_SUFFIXES = ("bias", "cls_token", "pos_embed")


def scaled_lr(cfg: OptimConfig, world_size: int) -> float:
    """The peak LR after optim.lr_scaling with `world_size` processes (none: lr; sqrt: lr·√w; linear: lr·w)."""
    factor = {"none": 1.0, "sqrt": math.sqrt(world_size), "linear": float(world_size)}[cfg.lr_scaling]
    return cfg.lr * factor


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters in at most two groups: decayed, and not decayed.

    With optim.decay_norm_and_bias=True (the default) biases, normalisation gains, 1-element-per-channel
    scales (every tensor with fewer than 2 dimensions) and token/position embeddings get no weight decay;
    with False every parameter is decayed, as the reference did. Frozen parameters are left out.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = cfg.decay_norm_and_bias and (p.ndim < 2 or name.endswith(_NO_DECAY_SUFFIXES)
                                              or _is_scale(name, p))
        (no_decay if exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def _is_scale(name: str, p: torch.Tensor) -> bool:
    # ScaleSkip2D's (1, C, 1, 1) scales and biases are per-channel affine parameters, like a norm's gain.
    return p.ndim == 4 and p.shape[0] == 1 and p.shape[2] == 1 and p.shape[3] == 1


def build_optimizer(model: nn.Module, cfg: OptimConfig, world_size: int = 1,
                    cpu_offload: bool = False) -> torch.optim.Optimizer:
    """AdamW over param_groups(model) at the scaled peak LR.

    cpu_offload=True returns DeepSpeed's CPU Adam (AdamW mode), which ZeRO-Offload needs; it compiles an
    extension the first time (minutes), so it is used only when offload is asked for. Refuses a model without
    trainable parameters.
    """
    groups = param_groups(model, cfg)
    if not groups:
        raise ValueError("the model has no trainable parameters (all frozen?): nothing to optimise")
    lr = scaled_lr(cfg, world_size)
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float, warmup: str = "linear",
              warmup_gamma: float = 10.0, warmup_stages: int = 5) -> float:
    """Multiplier of the peak LR for the optimizer step with 0-based index `step`.

    Warm-up over `warmup_steps` steps: "linear" (the first step already gets 1/warmup, never 0), or "geometric"
    (the published fine-tuning's MultiStepLR: `warmup_stages` equal stages, stage k at warmup_gamma**(k -
    warmup_stages), i.e. 1e-5, 1e-4, ... 1e-1 for 5 stages of gamma 10). Then a cosine from 1 down to
    `min_lr_ratio` at the last step (`total_steps` - 1).
    """
    if warmup_steps > 0 and step < warmup_steps:
        if warmup == "geometric":
            stage = step * warmup_stages // warmup_steps
            return float(warmup_gamma) ** (stage - warmup_stages)
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The warm-up + cosine schedule over `total_steps` optimizer steps; call .step() once per optimizer step."""
    warmup = min(cfg.warmup_steps, max(0, total_steps - 1))
    # A partial, not an object with attributes: LambdaLR saves a callable object's __dict__ and restores it on
    # load, which would bring back an old total_steps when a finished run is extended (train.steps raised).
    fn = functools.partial(lr_factor, total_steps=total_steps, warmup_steps=warmup, min_lr_ratio=cfg.min_lr_ratio,
                           warmup=cfg.warmup, warmup_gamma=cfg.warmup_gamma, warmup_stages=cfg.warmup_stages)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def lr_of(optimizer: torch.optim.Optimizer) -> float:
    """The current LR of the first parameter group."""
    return float(optimizer.param_groups[0]["lr"])


__all__ = ["scaled_lr", "param_groups", "build_optimizer", "lr_factor", "build_scheduler", "lr_of"]
