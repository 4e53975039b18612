"""Training precision: which one a run uses, the autocast context the forward passes run under, and the gradient
scaler fp16 needs."""

from __future__ import annotations

import contextlib

import torch

from phileo.config import ConfigError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: str) -> str:
    """The precision a run uses: "fp32", "bf16" or "fp16". "auto" means bf16 on a GPU that supports it, fp32
    otherwise. Refuses (ConfigError) fp16 off CUDA: its gradient scaler is a CUDA recipe, and CPU autocast in
    fp16 is neither fast nor what the published code ran."""
    if precision == "fp16" and not device.startswith("cuda"):
        raise ConfigError(f"train.precision=fp16 (fp16 autocast with a gradient scaler, as the published fine-tuning "
                          f"ran) needs a CUDA GPU; this run is on {device}. Set train.precision=fp32 (or bf16) to "
                          f"run it here")
    if precision in ("bf16", "fp16", "fp32"):
        return precision
    return "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"


def autocast(device: torch.device, precision: str | bool):
    """bf16 / fp16 autocast on `device` (`precision` as resolve_precision returns it; True means bf16), else a
    no-op context (training and evaluation share it)."""
    name = "bf16" if precision is True else precision
    if name not in _DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[name])


def grad_scaler(precision: str, device: str) -> torch.amp.GradScaler | None:
    """The dynamic loss scaler of fp16 training (torch.amp.GradScaler on the run's device type), None otherwise:
    bf16 has fp32's exponent range and needs none."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


__all__ = ["resolve_precision", "autocast", "grad_scaler"]
