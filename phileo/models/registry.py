"""Model presets registered by name, as in timm: `create_model("phileo_cnn_44m")`, `list_models()`.

Overrides use the published config names (`depths`, `dims`, `latent_dim`, `img_size`, `patch_size`, `embed_dim`,
`depth`, `num_heads`, `mlp_ratio`, ...), so any published configuration can be built, including straight from a
reference JSON: `create_model("phileo_vit_100m", **ref["config"])`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn

from phileo.models.phileo_cnn import PhilEOCNN, PhilEOCNNConfig, PhilEOCNNDownstream
from phileo.models.phileo_vit import PhilEOViT, PhilEOViTConfig
from phileo.models.upernet import PhilEOViTUPerNet


@dataclass(frozen=True)
class ModelSpec:
    """A registered preset: its family ("cnn" or "vit"), base config, a one-line description and defaults for
    its fine-tuning model (e.g. a narrower UPerNet for the tiny ViT)."""

    name: str
    family: str
    config: PhilEOCNNConfig | PhilEOViTConfig
    description: str
    downstream_defaults: tuple[tuple[str, Any], ...] = ()


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, family: str, config, description: str,
                   downstream_defaults: dict[str, Any] | None = None) -> ModelSpec:
    """Registers a preset under `name`; refuses a name already taken or an unknown family."""
    if name in _REGISTRY:
        raise ValueError(f"model name {name!r} is already registered")
    if family not in ("cnn", "vit"):
        raise ValueError(f"family must be 'cnn' or 'vit', got {family!r}")
    spec = ModelSpec(name, family, config, description, tuple((downstream_defaults or {}).items()))
    _REGISTRY[name] = spec
    return spec


register_model("phileo_cnn_tiny", "cnn",
               PhilEOCNNConfig(depths=(2, 2, 2, 2, 2), dims=(8, 8, 16, 16, 32), latent_dim=128),
               "Same U-Net code at demo size, for CPU tests and demos.")
register_model("phileo_cnn_44m", "cnn", PhilEOCNNConfig(),
               "Published PhilEO Geo-Aware U-Net 44M (PhilEO Globe / MajorTOM).")
register_model("phileo_cnn_200m", "cnn",
               PhilEOCNNConfig(depths=(3, 3, 12, 12, 5), dims=(86, 86, 256, 256, 512)),
               "Published PhilEO U-Net 200M (FastTOM / MajorTOM).")
register_model("phileo_vit_tiny", "vit",
               PhilEOViTConfig(patch_size=8, embed_dim=64, depth=4, num_heads=4, latent_dim=128, decoder_depth=2,
                               decoder_num_heads=4),
               "Same ViT code at demo size (patch 8, 4 blocks, 2-block decoder), for CPU tests and demos.",
               downstream_defaults={"upernet_channels": 32})
register_model("phileo_vit_100m", "vit", PhilEOViTConfig(),
               "Published PhilEO ViT 100M encoder (patch 4, D 512, 32 blocks, 16 heads).")
register_model("phileo_vit_300m", "vit",
               PhilEOViTConfig(embed_dim=1024, depth=24, num_heads=16),
               "PhilEO ViT 300M: ViT-L geometry (D 1024, 24 blocks, 16 heads) at patch 4; ~304M encoder.")


def list_models() -> list[str]:
    """Names of all registered presets, sorted."""
    return sorted(_REGISTRY)


def get_model_spec(name: str) -> ModelSpec:
    """The registered preset `name`; refuses unknown names with the list of known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}") from None


def get_model_config(name: str, **overrides) -> PhilEOCNNConfig | PhilEOViTConfig:
    """The config of preset `name` with `overrides` applied (see create_model for what is accepted)."""
    spec = get_model_spec(name)
    return _apply_overrides(spec.config, overrides, name)


def _apply_overrides(config, overrides: dict[str, Any], name: str):
    overrides = dict(overrides)
    chw = overrides.pop("chw", None)
    if chw is not None:  # the published ViT config spells input size as chw = [C, H, W]
        c, h, w = (int(v) for v in chw)
        if h != w:
            raise ValueError(f"{name}: only square inputs are supported, got chw={list(chw)}")
        for key, value in (("input_dim", c), ("img_size", h)):
            if key in overrides and int(overrides[key]) != value:
                raise ValueError(f"{name}: chw={list(chw)} contradicts {key}={overrides[key]}")
            overrides[key] = value
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"{name}: unknown config key(s) {unknown}; accepted: {sorted(fields | {'chw'})}")
    for key in ("depths", "dims"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    return dataclasses.replace(config, **overrides)


_PRETRAIN_CLASSES: dict[str, Callable[..., nn.Module]] = {"cnn": PhilEOCNN, "vit": PhilEOViT}
_DOWNSTREAM_EXTRA = {"cnn": set(), "vit": {"out_indices", "upernet_channels"}}


def create_model(name: str, **overrides) -> PhilEOCNN | PhilEOViT:
    """Builds the pretraining model registered as `name` (see list_models()).

    overrides: config fields by their published names (`depths`, `dims`, `latent_dim`, `img_size`, `input_dim`,
    `activation`, `patch_size`, `embed_dim`, `depth`, `num_heads`, `mlp_ratio`, `decoder_depth`, ...), `chw` as in
    the published ViT config, and `grad_checkpointing`. Build on the meta device with `with torch.device("meta"):`.
    Refuses unknown names and unknown or inconsistent keys.
    """
    spec = get_model_spec(name)
    model = _PRETRAIN_CLASSES[spec.family](_apply_overrides(spec.config, overrides, name))
    model.model_name = name
    return model


def create_downstream_model(name: str, num_outputs: int, freeze_encoder: bool = False, freeze_stem: bool = True,
                            **overrides) -> nn.Module:
    """Builds the fine-tuning model for pretraining preset `name`, with `num_outputs` output channels
    (1 for roads / buildings regression, 11 land-cover logits) at the input resolution.

    CNN names give PhilEOCNNDownstream (U-Net encoder-decoder, new CNNBlock head); ViT names give PhilEOViTUPerNet
    (extra overrides: `out_indices`, `upernet_channels`). forward(x) returns (B, num_outputs, S, S) raw outputs.
    freeze_encoder=True turns off gradients of stem + encoder (of the encoder only with freeze_stem=False). Load
    pretrained weights with load_pretrained().
    """
    spec = get_model_spec(name)
    overrides = {**dict(spec.downstream_defaults), **overrides}
    extra = {k: overrides.pop(k) for k in list(overrides) if k in _DOWNSTREAM_EXTRA[spec.family]}
    config = _apply_overrides(spec.config, overrides, name)
    if spec.family == "cnn":
        model = PhilEOCNNDownstream(config, num_outputs=num_outputs, freeze_encoder=freeze_encoder,
                                    freeze_stem=freeze_stem)
    else:
        model = PhilEOViTUPerNet(config, num_outputs=num_outputs, freeze_encoder=freeze_encoder,
                                 freeze_stem=freeze_stem, **extra)
    model.model_name = name
    return model


__all__ = ["ModelSpec", "register_model", "list_models", "get_model_spec", "get_model_config", "create_model",
           "create_downstream_model"]
