"""The fine-tuning job config: typed sections, the reference recipe as defaults (see PHILEO_BENCH.md).

Kept apart from phileo.train.finetune so that sweep expansion (on a login node, before anything is submitted)
can validate every array task's overrides without importing the models or the training engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from phileo.config import ConfigError

TASK_NAMES = ("roads", "building", "lc")


@dataclass
class FinetuneModelConfig:
    """name: a phileo.models preset (phileo_cnn_44m, phileo_vit_100m, ...). init: where the encoder starts from:
    "scratch" (random), a pretraining run folder (its newest checkpoint), a checkpoint folder or its model.pt, or a
    published weights file (.pt/.pth/.safetensors) read by phileo.models.load_pretrained. freeze_encoder: train
    only the decoder and head (decoder probing). kwargs: architecture overrides passed to the model builder
    (e.g. a tiny model for tests: {dims: [8, 8], depths: [1, 1], latent_dim: 16, img_size: 32})."""

    name: str = "phileo_cnn_44m"
    init: str = "scratch"
    freeze_encoder: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not self.name:
            raise ConfigError("model.name is empty: name a phileo.models preset, e.g. phileo_cnn_44m")
        if not self.init:
            raise ConfigError("model.init is empty: use 'scratch' or a checkpoint / run folder / weights file")


@dataclass
class FinetuneDataConfig:
    """root: the PhilEO-downstream folder (the *_s2.npy files). task: roads | building | lc. n_shot: training
    patches per regional bucket (validation: ceil(val_ratio * n_shot)). nshot_seed: the selection seed, the same
    for every model and training seed so they all see the same patches. nshot_index_dir: where the selection
    JSON lives (default {root}/nshot_indices; set it when root is read-only). batch_size is per process."""

    root: str = ""
    task: Literal["roads", "building", "lc"] = "roads"
    n_shot: int = 50
    nshot_seed: int = 97
    val_ratio: float = 0.2
    nshot_index_dir: str = ""
    normalisation: Literal["reflectance", "standardise", "none"] = "reflectance"
    augment: bool = False
    batch_size: int = 16
    eval_batch_size: int = 0  # 0: same as batch_size
    num_workers: int = 4

    def validate(self) -> None:
        if self.n_shot < 1:
            raise ConfigError(f"data.n_shot must be >= 1, got {self.n_shot}")
        if not 0 < self.val_ratio <= 1:
            raise ConfigError(f"data.val_ratio must be within (0, 1], got {self.val_ratio}")
        if self.batch_size < 1 or self.eval_batch_size < 0 or self.num_workers < 0:
            raise ConfigError("data.batch_size must be >= 1 and data.eval_batch_size, data.num_workers >= 0")


@dataclass
class FinetuneOptimConfig:
    """AdamW as in the reference: lr is the base learning rate, scaled by sqrt(world size) when
    scale_lr_with_world_size; warm-up starts at warmup_start_factor * lr and multiplies the LR by
    (1/warmup_start_factor)^(1/warmup_epochs) each epoch (x10 per epoch for the defaults) up to lr, then constant."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    eps: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_epochs: int = 5
    warmup_start_factor: float = 1e-5
    scale_lr_with_world_size: bool = True
    grad_clip_norm: float = 0.0  # 0: no clipping

    def validate(self) -> None:
        if self.lr <= 0 or self.eps <= 0 or self.weight_decay < 0:
            raise ConfigError(f"optim.lr and optim.eps must be > 0 and optim.weight_decay >= 0 "
                              f"(got lr={self.lr}, eps={self.eps}, weight_decay={self.weight_decay})")
        if self.warmup_epochs < 0 or not 0 < self.warmup_start_factor <= 1:
            raise ConfigError("optim.warmup_epochs must be >= 0 and optim.warmup_start_factor within (0, 1]")


@dataclass
class FinetuneTrainConfig:
    """max_epochs: upper bound (250 in the reference); early stopping after patience_epochs epochs without a
    better validation loss (min_delta: smallest improvement that counts). precision: fp32 | bf16 | auto (bf16 on
    GPUs that have it)."""

    max_epochs: int = 250
    patience_epochs: int = 50
    min_delta: float = 0.0
    seed: int = 0
    precision: Literal["fp32", "bf16", "auto"] = "auto"
    val_every_epochs: int = 1
    log_every_steps: int = 10

    def validate(self) -> None:
        if self.max_epochs < 1 or self.patience_epochs < 1 or self.val_every_epochs < 1:
            raise ConfigError("train.max_epochs, train.patience_epochs and train.val_every_epochs must be >= 1")


@dataclass
class FinetuneCheckpointConfig:
    """every_epochs: save a resumable checkpoint every this many epochs (and at the pre-timeout signal)."""

    every_epochs: int = 1
    keep_last: int = 1

    def validate(self) -> None:
        if self.every_epochs < 1 or self.keep_last < 1:
            raise ConfigError("checkpoint.every_epochs and checkpoint.keep_last must be >= 1")


@dataclass
class FinetuneRunConfig:
    dir: str = ""
    requeue_signals: list[str] = field(default_factory=lambda: ["USR2", "TERM"])


@dataclass
class FinetuneConfig:
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    checkpoint: FinetuneCheckpointConfig = field(default_factory=FinetuneCheckpointConfig)
    run: FinetuneRunConfig = field(default_factory=FinetuneRunConfig)


__all__ = ["FinetuneConfig", "FinetuneModelConfig", "FinetuneDataConfig", "FinetuneOptimConfig",
           "FinetuneTrainConfig", "FinetuneCheckpointConfig", "FinetuneRunConfig", "TASK_NAMES"]
