"""Training precision: which one a run uses, and the autocast context the forward passes run under."""

from __future__ import annotations

import contextlib

import torch


def resolve_precision(precision: str, device: str) -> bool:
    """True for bf16. "auto" means bf16 on a GPU that supports it, fp32 otherwise."""
    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    return device.startswith("cuda") and torch.cuda.is_bf16_supported()


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on `device` when bf16 is on, else a no-op context (training and evaluation share it)."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


__all__ = ["resolve_precision", "autocast"]
