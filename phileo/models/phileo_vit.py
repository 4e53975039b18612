"""PhilEO ViT: CNN stem + MAE-style ViT encoder (patch 4, fixed sin-cos positions, CLS token) + 12-block decoder.

Parameter names follow the published checkpoint (`stem`, `encoder.vit_encoder.{cls_token,pos_embed,patch_embed.proj,
blocks.i,norm}`, `encoder.linear_proj`, `encoder.head_*`, `decoder.decoder_blocks.i`, `decoder.norm`,
`decoder.reconstruction_layer`, `head`); note that here `head_clouds`/`head_landcover` are bare Linears while
`head_buildings.0`/`head_coords.0` sit in Sequentials with a Sigmoid, as published.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from phileo.models.base import PhilEOModel
from phileo.models.blocks import (
    CNNBlock,
    TransformerBlock,
    conv_out_hw,
    make_activation,
    run_blocks,
    sincos_pos_embed_2d,
    xavier_init_linear_and_norm,
)


@dataclass(frozen=True)
class PhilEOViTConfig:
    """One PhilEO ViT architecture; field names as in the published configs.

    input_dim: input bands; img_size: input height = width; patch_size: ViT patch (4 published);
    embed_dim/depth/num_heads/mlp_ratio: encoder geometry; latent_dim: embedding size of the pretraining heads;
    activation: of the stem/head CNNBlocks ("LeakyReLU" published); decoder_depth/decoder_num_heads: the
    reconstruction decoder (12 blocks, 8 heads in the published model whatever the encoder);
    grad_checkpointing: recompute each transformer block in backward.
    """

    input_dim: int = 10
    img_size: int = 128
    patch_size: int = 4
    embed_dim: int = 512
    depth: int = 32
    num_heads: int = 16
    mlp_ratio: float = 4.0
    latent_dim: int = 1024
    activation: str = "LeakyReLU"
    decoder_depth: int = 12
    decoder_num_heads: int = 8
    output_dim: int | None = None
    grad_checkpointing: bool = False

    def __post_init__(self):
        self.grid_size  # validates img_size / patch_size
        for name in ("embed_dim", "depth", "num_heads", "latent_dim", "decoder_num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads or self.embed_dim % self.decoder_num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads} and "
                             f"decoder_num_heads {self.decoder_num_heads}")
        if self.embed_dim % 4:
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by 4 (2-D sin-cos positions)")
        make_activation(self.activation)

    @property
    def grid_size(self) -> int:
        """Patches per side (img_size / patch_size)."""
        return conv_out_hw(self.img_size, self.patch_size)

    @property
    def out_channels(self) -> int:
        return self.input_dim if self.output_dim is None else self.output_dim


class PatchEmbed(nn.Module):
    """timm's PatchEmbed: conv with kernel = stride = patch, then (B, C, h, w) → (B, h·w, C) row-major tokens."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ViTEncoder(nn.Module):
    """MAE-style ViT backbone: patch tokens + fixed sin-cos positions, CLS first, pre-norm blocks, final norm."""

    def __init__(self, cfg: PhilEOViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.input_dim, cfg.embed_dim, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        # A Parameter with requires_grad=False, not a buffer, as in MAE: the published checkpoint stores it and the
        # published parameter total counts it.
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid_size ** 2 + 1, cfg.embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.pos_embed.is_meta:
            return
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.cfg.embed_dim, self.cfg.grid_size, cls_token=True))
            w = self.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.normal_(self.cls_token, std=0.02)
        self.apply(xavier_init_linear_and_norm)

    def forward(self, x: torch.Tensor, keep: Sequence[int] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Returns all tokens after the final norm (B, 1 + h·w, D) and the hidden states of the blocks in `keep`
        (the last block's state is taken after the final norm, as in the reference)."""
        x = self.patch_embed(x) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        x, kept = run_blocks(self.blocks, x, self.cfg.grad_checkpointing, keep)
        x = self.norm(x)
        last = len(self.blocks) - 1
        if last in kept:
            kept[last] = x
        return x, kept


class FoundationViTEncoder(nn.Module):
    """`vit_encoder` + CLS projection to the embedding (`linear_proj`) + the four pretraining heads (optional)."""

    def __init__(self, cfg: PhilEOViTConfig, with_heads: bool = True):
        super().__init__()
        self.vit_encoder = ViTEncoder(cfg)
        self.with_heads = with_heads
        if with_heads:
            self.linear_proj = nn.Linear(cfg.embed_dim, cfg.latent_dim)
            self.head_clouds = nn.Linear(cfg.latent_dim, 4)
            self.head_landcover = nn.Linear(cfg.latent_dim, 11)
            self.head_buildings = nn.Sequential(nn.Linear(cfg.latent_dim, 1), nn.Sigmoid())
            self.head_coords = nn.Sequential(nn.Linear(cfg.latent_dim, 4), nn.Sigmoid())

    def heads(self, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "coords": self.head_coords(embedding),
            "clouds": self.head_clouds(embedding),
            "buildings": self.head_buildings(embedding),
            "landcover": self.head_landcover(embedding),
        }


class FoundationViTDecoder(nn.Module):
    """Transformer blocks on all tokens → norm → drop CLS → (D, h, w) → 1×1 conv → bilinear resize."""

    def __init__(self, cfg: PhilEOViTConfig):
        super().__init__()
        self.cfg = cfg
        self.decoder_blocks = nn.ModuleList(
            TransformerBlock(cfg.embed_dim, cfg.decoder_num_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth)
        )
        self.norm = nn.LayerNorm(cfg.embed_dim)
        self.reconstruction_layer = nn.Conv2d(cfg.embed_dim, cfg.input_dim, kernel_size=1)
        self.apply(xavier_init_linear_and_norm)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x, _ = run_blocks(self.decoder_blocks, tokens, self.cfg.grad_checkpointing)
        x = self.norm(x)
        g = self.cfg.grid_size
        x = x[:, 1:, :].transpose(1, 2).reshape(-1, self.cfg.embed_dim, g, g)
        x = self.reconstruction_layer(x)
        return F.interpolate(x, size=(self.cfg.img_size, self.cfg.img_size), mode="bilinear", align_corners=False)


class PhilEOViT(PhilEOModel):
    """The PhilEO ViT pretraining model.

    forward(x: (B, input_dim, S, S)) returns the same dict as PhilEOCNN: reconstruction (B, output_dim, S, S) in
    [0, 1], embedding (B, latent_dim) (projected CLS token), coords, clouds, buildings, landcover.
    Loads the published `phileo_vit_100m` state dict unchanged (strict).
    """

    def __init__(self, config: PhilEOViTConfig | None = None, **overrides):
        super().__init__()
        cfg = config or PhilEOViTConfig()
        if overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        self.config = cfg
        act = make_activation(cfg.activation)
        hw = (cfg.img_size, cfg.img_size)
        self.stem = CNNBlock(cfg.input_dim, cfg.input_dim, hw, act)
        self.encoder = FoundationViTEncoder(cfg, with_heads=True)
        self.decoder = FoundationViTDecoder(cfg)
        self.head = CNNBlock(cfg.input_dim, cfg.out_channels, hw, act, activation_out=nn.Sigmoid())
        if not self.encoder.linear_proj.weight.is_meta:
            for m in (self.encoder.linear_proj, self.encoder.head_clouds, self.encoder.head_landcover,
                      self.encoder.head_buildings, self.encoder.head_coords):
                m.apply(xavier_init_linear_and_norm)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        self.encoder.vit_encoder.cfg = self.decoder.cfg = self.config

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens, _ = self.encoder.vit_encoder(self.stem(x))
        embedding = self.encoder.linear_proj(tokens[:, 0, :])
        out = {"reconstruction": self.head(self.decoder(tokens)), "embedding": embedding}
        out.update(self.encoder.heads(embedding))
        return out


__all__ = ["PhilEOViTConfig", "PatchEmbed", "ViTEncoder", "FoundationViTEncoder", "FoundationViTDecoder", "PhilEOViT"]
