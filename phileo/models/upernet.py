"""UPerNet decoder (PPM + FPN, as mmseg's UPerHead) and the ViT-UPerNet fine-tuning model.

The ViT-UPerNet reuses the PhilEO ViT `stem` and `encoder.vit_encoder` under the same names, so a pretraining
checkpoint loads into it by name (see phileo.models.checkpoint.load_pretrained); the pretraining-only parts
(`encoder.linear_proj`, `encoder.head_*`, `decoder.*`, `head.*`) are left out of the model instead of being carried
as unused parameters (which DDP would refuse).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from phileo.models.base import PhilEODownstreamModel, PhilEOModel
from phileo.models.blocks import CNNBlock, make_activation
from phileo.models.phileo_vit import FoundationViTEncoder, PhilEOViTConfig


class ConvBNReLU(nn.Sequential):
    """mmcv's ConvModule with BN and ReLU: conv (no bias, BN follows) → bn → activate."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)


class UPerNetHead(nn.Module):
    """UPerNet (Xiao et al. 2018) as mmseg's UPerHead: a pyramid pooling module (PPM, pool scales 1, 2, 3, 6) on the
    coarsest level, FPN lateral 1×1 and output 3×3 convs, all levels resized to the finest one and fused by a 3×3
    bottleneck; then Dropout2d(0.1) and a 1×1 classifier `conv_seg`.

    Takes the channels of the four levels (finest first), the inner width (256) and the number of outputs;
    forward(levels) returns (B, num_outputs, H_finest, W_finest).
    """

    def __init__(self, in_channels: Sequence[int], num_outputs: int, channels: int = 256,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        self.in_channels, self.channels, self.pool_scales = list(in_channels), channels, tuple(pool_scales)
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(in_channels[-1], channels, 1)) for s in pool_scales
        )
        self.bottleneck = ConvBNReLU(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_outputs, 1)
        nn.init.normal_(self.conv_seg.weight, 0.0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [x] + [_resize(ppm(x), x.shape[2:]) for ppm in self.psp_modules]
        return self.bottleneck(torch.cat(outs, dim=1))

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(levels) != len(self.in_channels):
            raise ValueError(f"UPerNet expects {len(self.in_channels)} feature levels, got {len(levels)}")
        laterals = [conv(levels[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.psp_forward(levels[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down path
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [self.fpn_convs[i](laterals[i]) for i in range(len(laterals) - 1)] + [laterals[-1]]
        outs = [outs[0]] + [_resize(o, outs[0].shape[2:]) for o in outs[1:]]
        return self.conv_seg(self.dropout(self.fpn_bottleneck(torch.cat(outs, dim=1))))


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _upsample_steps(channels: int, steps: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(steps):
        layers += [nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2),
                   nn.BatchNorm2d(channels // 2), nn.ReLU(inplace=True)]
        channels //= 2
    return nn.Sequential(*layers)


class ViTPyramid(nn.Module):
    """Turns four ViT hidden states (grid g×g, D channels) into a 4-level pyramid for UPerNet:
    fpn1: 2 × (ConvTranspose 2×2 s2 + BN + ReLU) → D/4 at 4g; fpn2: one step → D/2 at 2g;
    fpn3: BN + ReLU → D at g; fpn4: 2×2 max-pool → D at g/2."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.fpn1 = _upsample_steps(embed_dim, 2)
        self.fpn2 = _upsample_steps(embed_dim, 1)
        self.fpn3 = nn.Sequential(nn.BatchNorm2d(embed_dim), nn.ReLU(inplace=True))
        self.fpn4 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.out_channels = [embed_dim // 4, embed_dim // 2, embed_dim, embed_dim]

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [f(m) for f, m in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), maps)]


def default_out_indices(depth: int) -> tuple[int, ...]:
    """Hidden states fed to UPerNet: depth·(1/4, 2/4, 3/4, 4/4) − 1 (7, 15, 23, 31 for depth 32)."""
    if depth < 4:
        raise ValueError(f"ViT-UPerNet needs at least 4 blocks to pick 4 hidden states, got depth {depth}")
    return tuple(depth * k // 4 - 1 for k in (1, 2, 3, 4))


class PhilEOViTUPerNet(PhilEODownstreamModel):
    """ViT-UPerNet for dense fine-tuning: PhilEO ViT stem + encoder, ViTPyramid, UPerNetHead.

    forward(x: (B, input_dim, S, S)) returns (B, num_outputs, S, S) raw logits/values (the pyramid's finest level
    is 4·S/patch_size = S for patch 4; other patch sizes are resized to S).
    out_indices: the 4 encoder blocks whose hidden states (CLS dropped) form the pyramid, default
    default_out_indices(depth). freeze_encoder=True sets requires_grad=False on stem + encoder; freeze_stem=False
    leaves the stem trainable then (the published phivit_upernet_pretrained froze only the ViT encoder).
    Refuses out_indices that are not 4 increasing block indices within the encoder depth.
    """

    def __init__(self, config: PhilEOViTConfig | None = None, num_outputs: int = 11, freeze_encoder: bool = False,
                 out_indices: Sequence[int] | None = None, upernet_channels: int = 256, freeze_stem: bool = True,
                 **overrides):
        super().__init__()
        cfg = config or PhilEOViTConfig()
        if overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        if num_outputs < 1:
            raise ValueError(f"num_outputs must be >= 1 (1 for roads/buildings, 11 for land cover), got {num_outputs}")
        out_indices = tuple(default_out_indices(cfg.depth) if out_indices is None else out_indices)
        if len(out_indices) != 4 or list(out_indices) != sorted(set(out_indices)) or not (
                0 <= out_indices[0] and out_indices[-1] < cfg.depth):
            raise ValueError(f"out_indices must be 4 increasing block indices in [0, {cfg.depth - 1}], "
                             f"got {out_indices}")
        self.config, self.num_outputs, self.freeze_encoder = cfg, num_outputs, freeze_encoder
        self.freeze_stem = freeze_stem
        self.out_indices, self.upernet_channels = out_indices, upernet_channels
        act = make_activation(cfg.activation)
        self.stem = CNNBlock(cfg.input_dim, cfg.input_dim, (cfg.img_size, cfg.img_size), act)
        self.encoder = FoundationViTEncoder(cfg, with_heads=False)
        self.neck = ViTPyramid(cfg.embed_dim)
        self.decoder = UPerNetHead(self.neck.out_channels, num_outputs, channels=upernet_channels)
        if freeze_encoder:
            self.set_encoder_frozen(True)

    def _init_kwargs(self):
        return {"config": self.config, "num_outputs": self.num_outputs, "freeze_encoder": self.freeze_encoder,
                "out_indices": self.out_indices, "upernet_channels": self.upernet_channels,
                "freeze_stem": self.freeze_stem}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        self.encoder.vit_encoder.cfg = self.config

    def set_encoder_frozen(self, frozen: bool = True) -> None:
        """Freezes (or unfreezes) stem + encoder (the stem only when freeze_stem); pos_embed stays frozen either
        way (it is a fixed table)."""
        part = {id(p) for p in self.frozen_part_parameters()}
        for name, p in self.named_parameters():
            if id(p) in part and not name.endswith("pos_embed"):
                p.requires_grad_(not frozen)
        self.freeze_encoder = frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, kept = self.encoder.vit_encoder(self.stem(x), keep=self.out_indices)
        g = self.config.grid_size
        maps = [kept[i][:, 1:, :].transpose(1, 2).reshape(x.shape[0], -1, g, g) for i in self.out_indices]
        out = self.decoder(self.neck(maps))
        return _resize(out, (self.config.img_size, self.config.img_size))


__all__ = ["ConvBNReLU", "UPerNetHead", "ViTPyramid", "PhilEOViTUPerNet", "default_out_indices"]
