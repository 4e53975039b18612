"""What every PhilEO model reports about itself: parameter count and forward FLOPs per sample.

FLOP convention (the one that reproduces the published figures, see README.md, "Models"): FLOPs are counted by
`torch.utils.flop_counter.FlopCounterMode`, i.e. 2 FLOPs per multiply-accumulate of every convolution, transposed
convolution, matrix multiply and attention product, and nothing for norms, activations, pooling, padding or
interpolation. One forward pass of one (input_dim, img_size, img_size) sample. The count is taken on the `meta`
device (shapes only), so it costs milliseconds and no memory even for the 300M models.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def count_forward_flops(model: nn.Module, input_shape: tuple[int, ...], batch_size: int = 1) -> int:
    """Forward FLOPs of `model` on one batch of `input_shape` samples (2 per multiply-add, see module docstring).

    Runs the model in eval mode under FlopCounterMode with an input on the model's device; use a meta-device model
    to count without computing. Returns the total for the batch.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = torch.zeros((batch_size, *input_shape), device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


class PhilEOModel(nn.Module):
    """Base of all PhilEO models: holds the typed `config` and answers num_params() / flops_per_sample().

    Subclasses set `self.config` (a dataclass with `input_dim` and `img_size`) and can be rebuilt from it with
    `type(self)(**self._init_kwargs())`.
    """

    config: Any
    model_name: str | None = None  # the registry preset it was built from, set by create_model

    def num_params(self, trainable_only: bool = False) -> int:
        """Number of parameters (all of them by default, frozen ones such as the ViT `pos_embed` included: the
        published totals count them); with trainable_only, those with requires_grad."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one input sample."""
        return (self.config.input_dim, self.config.img_size, self.config.img_size)

    def _init_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this model (same architecture, fresh weights)."""
        return {"config": self.config}

    def flops_per_sample(self) -> float:
        """Forward FLOPs for one sample at the model's input size (2 per multiply-accumulate; see module doc)."""
        cached = getattr(self, "_flops_per_sample_cache", None)
        if cached is None:
            if next(self.parameters()).is_meta:
                clone = self
            else:
                with torch.device("meta"):
                    clone = type(self)(**self._init_kwargs())
            cached = float(count_forward_flops(clone, self.input_shape))
            object.__setattr__(self, "_flops_per_sample_cache", cached)
        return cached

    def compile_blocks(self, **compile_kwargs) -> "PhilEOModel":
        """Regional compilation, as torchtitan does per transformer block: torch.compile each repeated block
        (CNNBlock, TransformerBlock) in place. Blocks of equal shape share one compiled graph, so compiling a
        32-block ViT costs about one block, and parameter names stay unchanged (no `_orig_mod.`). The glue between
        blocks runs eagerly. The U-Net has one block variant per resolution and input layout (~10), more than
        dynamo's default of 8 recompilations per function, past which it would silently fall back to eager, so
        the limit is raised to the number of blocks (at most 64). Returns self."""
        import torch._dynamo

        from phileo.models.blocks import CNNBlock, TransformerBlock

        blocks = [m for m in self.modules() if isinstance(m, (CNNBlock, TransformerBlock))]
        config = torch._dynamo.config
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, limit, max(getattr(config, limit), min(len(blocks), 64)))
        for module in blocks:
            module.compile(**compile_kwargs)
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turns activation checkpointing of the repeated blocks on or off (trades ~30 % more compute for memory)."""
        self.config = dataclasses.replace(self.config, grad_checkpointing=enable)


__all__ = ["count_forward_flops", "PhilEOModel"]


class PhilEODownstreamModel(PhilEOModel):
    """A fine-tuning model: a pretrained part (`encoder_modules()`: stem + encoder) and a part trained from the
    task (everything else), so fine-tuners can freeze, probe or give the two parts different learning rates."""

    def encoder_modules(self) -> list[nn.Module]:
        return [self.stem, self.encoder]

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the pretrained part (stem + encoder)."""
        for m in self.encoder_modules():
            yield from m.parameters()

    def frozen_part_parameters(self) -> Iterator[nn.Parameter]:
        """What freeze_encoder freezes: the pretrained part, without the stem when `freeze_stem` is false."""
        keep = self.stem.parameters() if not getattr(self, "freeze_stem", True) else ()
        skip = {id(p) for p in keep}
        return (p for p in self.encoder_parameters() if id(p) not in skip)

    def decoder_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters trained from the task (decoder / neck and head)."""
        enc = {id(p) for p in self.encoder_parameters()}
        return (p for p in self.parameters() if id(p) not in enc)

