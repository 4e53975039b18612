"""The fine-tuning job config: the engine's sections with the reference recipe as defaults, plus epochs.

Kept apart from phileo.bench.finetune so that sweep expansion (on a login node, before anything is submitted)
can check every array task's overrides without importing the models or building anything.

Sections: model, data, finetune (epochs, early stopping), and the engine's optim, train, checkpoint, run
(phileo.train.config). Defaults follow the reference fine-tuning (PHILEO_BENCH.md): AdamW with eps 1e-6 and
weight decay on every parameter, LR 1e-3 x sqrt(world size), batch 16 per GPU, up to 250 epochs, early stopping
after 50 epochs without a better validation loss, 5 warm-up epochs, bf16 where the GPU has it.

The engine counts optimizer steps, the bench protocol counts epochs: train.steps, train.eval_every_steps,
optim.warmup_steps and checkpoint.every_steps are computed from the finetune.* epoch settings, the n-shot
training set size, the batch size and the world size when the run starts (values given for them are replaced).
Differences from the reference in the default recipe: its warm-up multiplied the LR by 10 each epoch from
1e-5 x lr (optim.warmup=geometric); here the engine's linear warm-up over the same epochs is used, then the LR
stays constant (optim.min_lr_ratio=1.0; lower it for a cosine decay over max_epochs); it trained in fp16 with a
gradient scaler (train.precision=fp16), here bf16 where the GPU has it; a frozen ViT-UPerNet kept its stem
trainable (model.freeze_stem=false). `--recipe published` (phileo.train.recipes) sets all three.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from phileo.config import ConfigError
from phileo.train.config import (CheckpointConfig, JobConfig, LoaderConfig, ModelConfig, OptimConfig, RunConfig,
                                 TrainConfig)

TASK_NAMES = ("roads", "building", "lc")


@dataclass
class FinetuneModelConfig(ModelConfig):
    """name: a phileo.models preset (phileo_cnn_44m, phileo_cnn_200m, phileo_vit_100m, phileo_cnn_tiny, ...).
    init: where the weights start from: "scratch" (random), a pretraining run folder (its newest checkpoint), a
    checkpoint folder or its model.pt, or a published weights file; read by phileo.models.load_pretrained, which
    transfers a pretraining encoder (and the U-Net decoder) and starts the task head fresh.
    freeze_encoder: train only the decoder and head (decoder probing). freeze_stem: with freeze_encoder, freeze
    the stem (the convolution block in front of the encoder) too; false keeps it training, as the published
    ViT-UPerNet did (--recipe published sets it per family). overrides: config fields of the preset by their
    published names (e.g. {img_size: 64} for 64 px patches)."""

    init: str = "scratch"
    freeze_encoder: bool = False
    freeze_stem: bool = True

    def validate(self) -> None:
        if not self.name:
            raise ConfigError("model.name is empty: name a phileo.models preset, e.g. phileo_cnn_44m")
        if not self.init:
            raise ConfigError("model.init is empty: use 'scratch', a pretraining run folder, a checkpoint or a "
                              "published weights file")


@dataclass
class FinetuneDataConfig(LoaderConfig):
    """root: the PhilEO-downstream folder (*_s2.npy + label files). task: roads | building | lc. n_shot: training
    patches per regional bucket (validation: ceil(val_ratio * n_shot) per bucket). nshot_seed: the selection seed,
    the same for every model and training seed so that all see the same patches. nshot_index_dir: where the
    selection JSON is kept (default {root}/nshot_indices; set it when root is read-only). nshot_index: a published
    selection to use instead of drawing one (a phileo-bench/indices/*.json file, or the folder of them: the file for
    the task and n_shot is found by name; see phileo.bench.published_nshot). batch_size: per process.
    eval_batch_size (a loader key): for validation and test (0: batch_size)."""

    batch_size: int = 16
    root: str = ""
    task: Literal["roads", "building", "lc"] = "roads"
    n_shot: int = 50
    nshot_seed: int = 97
    val_ratio: float = 0.2
    nshot_index_dir: str = ""
    nshot_index: str = ""
    normalisation: Literal["reflectance", "standardise", "none"] = "reflectance"
    augment: bool = False

    def validate(self) -> None:
        super().validate()
        if self.n_shot < 1:
            raise ConfigError(f"data.n_shot must be >= 1 (patches per region bucket), got {self.n_shot}")
        if not 0 < self.val_ratio <= 1:
            raise ConfigError(f"data.val_ratio must be within (0, 1], got {self.val_ratio}")


@dataclass
class EpochConfig:
    """The bench protocol in epochs (one epoch = the n-shot training set once, over all processes).
    max_epochs: upper bound; patience_epochs: stop after this many epochs without a validation loss lower than
    the best by more than min_delta; warmup_epochs: linear LR warm-up; val_every_epochs: validation interval;
    checkpoint_every_epochs: resumable checkpoints (one is also written at the pre-timeout signal and at the end)."""

    max_epochs: int = 250
    patience_epochs: int = 50
    min_delta: float = 0.0
    warmup_epochs: int = 5
    val_every_epochs: int = 1
    checkpoint_every_epochs: int = 10

    def validate(self) -> None:
        for name in ("max_epochs", "patience_epochs", "val_every_epochs", "checkpoint_every_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"finetune.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_epochs < 0 or self.min_delta < 0:
            raise ConfigError("finetune.warmup_epochs and finetune.min_delta must be >= 0")


@dataclass
class FinetuneOptimConfig(OptimConfig):
    """The engine's AdamW section with the reference fine-tuning values as defaults (see module docstring)."""

    lr: float = 1e-3
    lr_scaling: Literal["none", "sqrt", "linear"] = "sqrt"
    eps: float = 1e-6
    decay_norm_and_bias: bool = False  # the reference decayed every parameter
    min_lr_ratio: float = 1.0  # constant LR after warm-up
    warmup_steps: int = 0  # computed from finetune.warmup_epochs


@dataclass
class FinetuneTrainConfig(TrainConfig):
    grad_clip_norm: float = 0.0  # the reference did not clip

    def validate(self) -> None:
        super().validate()
        if self.strategy != "ddp":
            raise ConfigError(f"train.strategy={self.strategy}: fine-tuning runs with ddp (every bench model fits "
                              f"one GPU; ZeRO would only add communication)")


@dataclass
class FinetuneCheckpointConfig(CheckpointConfig):
    keep_last: int = 1  # the newest is enough to resume; the best weights travel inside it
    # A finished run keeps best_model.pt and result.json; its resume checkpoint (the model, the optimizer state
    # and the best weights again: ~75 MB for the 44M CNN, x 360 tasks) is deleted unless this is true.
    keep_after_completion: bool = False


@dataclass
class FinetuneRunConfig(RunConfig):
    dir: str = "runs/finetune"
    image_every_steps: int = 0  # input / label / prediction grids in TensorBoard (0 = never)


@dataclass
class FinetuneConfig(JobConfig):
    """The whole fine-tuning job: the engine's shared sections with the reference fine-tuning defaults, plus
    `finetune` (the protocol in epochs); saved as run.dir/config.yaml and inside result.json."""

    job_kind: ClassVar[str] = "finetune"
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    finetune: EpochConfig = field(default_factory=EpochConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    checkpoint: FinetuneCheckpointConfig = field(default_factory=FinetuneCheckpointConfig)
    run: FinetuneRunConfig = field(default_factory=FinetuneRunConfig)


__all__ = ["FinetuneConfig", "FinetuneModelConfig", "FinetuneDataConfig", "EpochConfig", "FinetuneOptimConfig",
           "FinetuneTrainConfig", "FinetuneCheckpointConfig", "FinetuneRunConfig", "TASK_NAMES"]
