"""PhilEO CNN ("Geo-Aware U-Net"): the published U-Net foundation model and its fine-tuning wrapper.

Module and parameter names follow the published checkpoints exactly (`stem`, `encoder.blocks_down.i.j`,
`encoder.block_scalers.i`, `encoder.downsample.i.0`, `encoder.linear_encode.1`, `encoder.head_*`,
`decoder.linear_decode`, `decoder.skip_scalers.i`, `decoder.upsamplers.i.1`, `head`, ...); see
shared/reference/ARCHITECTURE.md and the contract tests in tests/test_models_contract.py.

Every norm covers (C, H, W), so a model is built for one `img_size` (128 for all published weights).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.utils.checkpoint

from phileo.models.base import PhilEODownstreamModel, PhilEOModel
from phileo.models.blocks import (
    ChwLayerNorm,
    CNNBlock,
    ReplicateConv2d,
    ScaleSkip2D,
    conv_out_hw,
    make_activation,
)


@dataclass(frozen=True)
class PhilEOCNNConfig:
    """One PhilEO CNN architecture. Field names are those of the published configs (`depths`, `dims`, ...).

    input_dim: input bands (10 for Sentinel-2 L2A as in MAJORTOM.md); output_dim: reconstruction channels
    (defaults to input_dim); depths/dims: CNNBlocks and channels per stage, from 128 px down to img_size/2^(n-1);
    latent_dim: embedding size; activation: "GELU" (published) or another name from blocks.ACTIVATIONS;
    grad_checkpointing: recompute each CNNBlock in backward instead of storing its activations.
    """

    input_dim: int = 10
    depths: tuple[int, ...] = (3, 3, 4, 4, 5)
    dims: tuple[int, ...] = (32, 32, 64, 64, 128)
    img_size: int = 128
    latent_dim: int = 1024
    activation: str = "GELU"
    output_dim: int | None = None
    grad_checkpointing: bool = False

    def __post_init__(self):
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
        if len(self.depths) != len(self.dims) or not self.depths:
            raise ValueError(f"depths {self.depths} and dims {self.dims} must have the same, non-zero length "
                             f"(one entry per U-Net stage)")
        if min(self.depths) < 1 or min(self.dims) < 1:
            raise ValueError(f"every stage needs at least one block and one channel: depths {self.depths}, "
                             f"dims {self.dims}")
        conv_out_hw(self.img_size, 2 ** (len(self.depths) - 1))
        make_activation(self.activation)  # refuses unknown names now, not at first forward

    @property
    def sizes(self) -> list[int]:
        """Spatial size of each encoder stage: img_size, img_size/2, ..."""
        return [self.img_size // 2 ** i for i in range(len(self.depths))]

    @property
    def out_channels(self) -> int:
        return self.input_dim if self.output_dim is None else self.output_dim


def _stage_scaler(channels: int, depth: int) -> ScaleSkip2D:
    # The published code creates a block scaler for every stage; forward uses it only where a stage has more than
    # one block. A one-block stage's scaler is kept so that every published configuration's state dict loads
    # strictly, and frozen (see freeze_unused), so that DDP (find_unused_parameters=False) never waits for its
    # gradient and AdamW's weight decay does not shrink it for nothing.
    scaler = ScaleSkip2D(channels)
    if depth == 1:
        freeze_unused(scaler)
    return scaler


def freeze_unused(module: nn.Module) -> None:
    """Marks a module that forward never calls (kept for checkpoint compatibility) and turns its gradients off.
    Unfreezing an encoder leaves such modules frozen (see trainable_in_forward)."""
    module.unused_in_forward = True
    module.requires_grad_(False)


def unused_parameter_names(model: nn.Module) -> set[str]:
    """State-dict names of the parameters of modules that forward never calls (one-block stages' scalers)."""
    return {f"{prefix}.{name}" if prefix else name
            for prefix, m in model.named_modules() if getattr(m, "unused_in_forward", False)
            for name, _ in m.named_parameters()}


def trainable_in_forward(model: nn.Module, params: Iterator[nn.Parameter]) -> Iterator[nn.Parameter]:
    """`params` without those of modules that forward never calls."""
    unused = {id(p) for m in model.modules() if getattr(m, "unused_in_forward", False) for p in m.parameters()}
    return (p for p in params if id(p) not in unused)


def infer_config(shapes: dict[str, tuple[int, ...]]) -> PhilEOCNNConfig | None:
    """The PhilEO CNN configuration whose state dict has these parameter names and shapes (a pretraining or a
    fine-tuning state dict), or None when they are not a PhilEO CNN's. Used to say which model a checkpoint
    needs when it fits no registered preset."""
    try:
        n = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.blocks_down."))
        depths = tuple(1 + max(int(k.split(".")[3]) for k in shapes if k.startswith(f"encoder.blocks_down.{i}."))
                       for i in range(n))
        dims = tuple(shapes[f"encoder.block_scalers.{i}.x_skipscale"][1] for i in range(n))
        input_dim = shapes["stem.conv1.weight"][1]
        img_size = shapes["stem.norm1.weight"][1]
        latent_dim = shapes["encoder.linear_encode.1.weight"][0]
        return PhilEOCNNConfig(input_dim=input_dim, depths=depths, dims=dims, img_size=img_size, latent_dim=latent_dim)
    except (KeyError, IndexError, ValueError):
        return None


class FoundationEncoder(nn.Module):
    """Encoder stages, bottleneck embedding and (optionally) the four pretraining heads on the embedding."""

    def __init__(self, cfg: PhilEOCNNConfig, with_heads: bool = True):
        super().__init__()
        self.cfg = cfg
        act = make_activation(cfg.activation)
        n, sizes, dims = len(cfg.depths), cfg.sizes, cfg.dims
        self.linear_dim = sizes[-1] * sizes[-1] * dims[-1]
        self.downsample = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dims[i], dims[i + 1], 1), nn.MaxPool2d(2, stride=2)) for i in range(n - 1)
        )
        self.block_scalers = nn.ModuleList(_stage_scaler(dims[i], cfg.depths[i]) for i in range(n))
        self.blocks_down = nn.ModuleList(
            nn.ModuleList(CNNBlock(dims[i], dims[i], (sizes[i], sizes[i]), act) for _ in range(cfg.depths[i]))
            for i in range(n)
        )
        self.prelinear_norm = ChwLayerNorm([dims[-1], sizes[-1], sizes[-1]])
        self.linear_encode = nn.Sequential(act, nn.Linear(self.linear_dim, cfg.latent_dim),
                                           nn.LayerNorm(cfg.latent_dim))
        self.with_heads = with_heads
        if with_heads:
            self.head_clouds = nn.Sequential(nn.Linear(cfg.latent_dim, 4))
            self.head_landcover = nn.Sequential(nn.Linear(cfg.latent_dim, 11))
            self.head_buildings = nn.Sequential(nn.Linear(cfg.latent_dim, 1), nn.Sigmoid())
            self.head_coords = nn.Sequential(nn.Linear(cfg.latent_dim, 4), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Returns (embedding (B, latent), bottleneck features (B, C, s, s) after prelinear_norm, stage skips)."""
        skips = []
        n = len(self.blocks_down)
        for i in range(n):
            stage_input = x
            for block in self.blocks_down[i]:
                x = _maybe_checkpoint(block, x, self.cfg.grad_checkpointing)
            if len(self.blocks_down[i]) > 1:
                x = self.block_scalers[i](x, stage_input)
            skips.append(x)
            if i < n - 1:
                x = self.downsample[i](x)
        bottleneck = self.prelinear_norm(x)
        embedding = self.linear_encode(bottleneck.reshape(bottleneck.shape[0], self.linear_dim))
        return embedding, bottleneck, skips

    def heads(self, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        """The pretraining heads: coords (B,4) in [0,1], clouds (B,4) logits, buildings (B,1) in [0,1],
        landcover (B,11) logits."""
        return {
            "coords": self.head_coords(embedding),
            "clouds": self.head_clouds(embedding),
            "buildings": self.head_buildings(embedding),
            "landcover": self.head_landcover(embedding),
        }


class FoundationDecoder(nn.Module):
    """U-Net decoder from the embedding and the encoder skips back to (dims[0], img_size, img_size)."""

    def __init__(self, cfg: PhilEOCNNConfig):
        super().__init__()
        self.cfg = cfg
        act = make_activation(cfg.activation)
        depths, dims, sizes = cfg.depths[::-1], cfg.dims[::-1], cfg.sizes[::-1]
        self.dims, self.bottom = dims, sizes[0]
        n = len(depths)
        self.linear_decode = nn.Linear(cfg.latent_dim, sizes[0] * sizes[0] * dims[0])
        self.latent_norm = ChwLayerNorm([dims[0], sizes[0], sizes[0]])
        self.prehead_norm = ChwLayerNorm([dims[-1], sizes[-1], sizes[-1]])
        self.skip_scalers = nn.ModuleList(ScaleSkip2D(dims[i]) for i in range(n))
        self.block_scalers = nn.ModuleList(_stage_scaler(dims[i], depths[i]) for i in range(n))
        self.blocks_up = nn.ModuleList(
            nn.ModuleList(CNNBlock(dims[i], dims[i], (sizes[i], sizes[i]), act) for _ in range(depths[i]))
            for i in range(n)
        )
        self.upsamplers = nn.ModuleList(
            nn.Sequential(
                nn.UpsamplingBilinear2d(scale_factor=2),  # align_corners=True, as published
                ReplicateConv2d(dims[i], dims[i + 1], 3, bias=False),
                ChwLayerNorm([dims[i + 1], sizes[i + 1], sizes[i + 1]]),
                act,
            )
            for i in range(n - 1)
        )

    def forward(self, embedding: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        x = self.linear_decode(embedding).reshape(-1, self.dims[0], self.bottom, self.bottom)
        if skips and skips[-1].is_contiguous(memory_format=torch.channels_last) and not skips[-1].is_contiguous():
            x = x.contiguous(memory_format=torch.channels_last)  # keep one layout through the decoder
        x = self.latent_norm(x)
        n = len(self.blocks_up)
        for i in range(n):
            x = self.skip_scalers[i](x, skips[-(i + 1)])
            stage_input = x
            for block in self.blocks_up[i]:
                x = _maybe_checkpoint(block, x, self.cfg.grad_checkpointing)
            if len(self.blocks_up[i]) > 1:
                x = self.block_scalers[i](x, stage_input)
            if i < n - 1:
                x = self.upsamplers[i](x)
        return self.prehead_norm(x)


def _maybe_checkpoint(block: nn.Module, x: torch.Tensor, enabled: bool) -> torch.Tensor:
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
    return block(x)


class PhilEOCNN(PhilEOModel):
    """The PhilEO CNN pretraining model (stem → encoder + heads → decoder → reconstruction head).

    forward(x: (B, input_dim, S, S) float, reflectance/10000) returns a dict:
      reconstruction (B, output_dim, S, S) in [0, 1], embedding (B, latent_dim), coords (B, 4) in [0, 1],
      clouds (B, 4) logits, buildings (B, 1) in [0, 1], landcover (B, 11) logits.
    Loads the published `ckpt["model"]` state dicts unchanged (strict) for the 44M / 200M configurations.
    """

    def __init__(self, config: PhilEOCNNConfig | None = None, **overrides):
        super().__init__()
        cfg = config or PhilEOCNNConfig()
        if overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        self.config = cfg
        act = make_activation(cfg.activation)
        self.stem = CNNBlock(cfg.input_dim, cfg.dims[0], (cfg.img_size, cfg.img_size), act)
        self.encoder = FoundationEncoder(cfg, with_heads=True)
        self.decoder = FoundationDecoder(cfg)
        self.head = CNNBlock(cfg.dims[0], cfg.out_channels, (cfg.img_size, cfg.img_size), act,
                             activation_out=nn.Sigmoid())

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        self.encoder.cfg = self.decoder.cfg = self.config

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(x)
        embedding, _, skips = self.encoder(x)
        decoded = self.decoder(embedding, skips)
        out = {"reconstruction": self.head(decoded), "embedding": embedding}
        out.update(self.encoder.heads(embedding))
        return out

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The published forward's intermediate outputs: embedding, bottleneck (after prelinear_norm) and decoded
        (after prehead_norm) features, for embedding studies."""
        embedding, bottleneck, skips = self.encoder(self.stem(x))
        return {"embedding": embedding, "bottleneck": bottleneck, "decoded": self.decoder(embedding, skips)}


class PhilEOCNNDownstream(PhilEODownstreamModel):
    """PhilEO CNN encoder-decoder for dense fine-tuning (roads / buildings: 1 value, land cover: 11 logits).

    Same `stem`, `encoder` (without the pretraining heads) and `decoder` as PhilEOCNN, so pretrained weights load by
    name; the reconstruction `head` is replaced by CNNBlock(dims[0] → num_outputs) with no output activation.
    forward(x) returns a tensor (B, num_outputs, S, S) of raw values/logits.
    freeze_encoder=True sets requires_grad=False on stem + encoder (the decoder and head stay trainable);
    freeze_stem=False leaves the stem trainable then.
    """

    def __init__(self, config: PhilEOCNNConfig | None = None, num_outputs: int = 1, freeze_encoder: bool = False,
                 freeze_stem: bool = True, **overrides):
        super().__init__()
        cfg = config or PhilEOCNNConfig()
        if overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        if num_outputs < 1:
            raise ValueError(f"num_outputs must be >= 1 (1 for roads/buildings, 11 for land cover), got {num_outputs}")
        self.config, self.num_outputs, self.freeze_encoder = cfg, num_outputs, freeze_encoder
        self.freeze_stem = freeze_stem
        act = make_activation(cfg.activation)
        self.stem = CNNBlock(cfg.input_dim, cfg.dims[0], (cfg.img_size, cfg.img_size), act)
        self.encoder = FoundationEncoder(cfg, with_heads=False)
        self.decoder = FoundationDecoder(cfg)
        self.head = CNNBlock(cfg.dims[0], num_outputs, (cfg.img_size, cfg.img_size), act,
                             activation_out=nn.Identity())
        if freeze_encoder:
            self.set_encoder_frozen(True)

    def _init_kwargs(self):
        return {"config": self.config, "num_outputs": self.num_outputs, "freeze_encoder": self.freeze_encoder,
                "freeze_stem": self.freeze_stem}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        self.encoder.cfg = self.decoder.cfg = self.config

    def set_encoder_frozen(self, frozen: bool = True) -> None:
        """Freezes (or unfreezes) stem + encoder (the stem only when freeze_stem): requires_grad off, so they get
        no gradients and no updates."""
        for p in trainable_in_forward(self, self.frozen_part_parameters()):
            p.requires_grad_(not frozen)
        self.freeze_encoder = frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embedding, _, skips = self.encoder(self.stem(x))
        return self.head(self.decoder(embedding, skips))


__all__ = ["PhilEOCNNConfig", "FoundationEncoder", "FoundationDecoder", "PhilEOCNN", "PhilEOCNNDownstream",
           "freeze_unused", "unused_parameter_names", "infer_config"]
