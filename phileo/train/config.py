"""The job config schema: one typed dataclass per concern, `JobConfig` for the sections every training job
shares, `PretrainConfig` for pretraining, and `build_config`, the one way a job config is built.

Every key can be set from the command line as `section.key=value` (phileo.config.apply_overrides); the launcher
maps its flags onto the same keys (`--model` → model.name, `--data` → data.root, `--batch-size` → data.batch_size,
`--steps` → train.steps, `--strategy` → train.strategy, `--seed` → train.seed, `--run-dir` → run.dir).

`JobConfig` holds the sections the generic `phileo.train.engine.Trainer` reads: `model` (a registered model name),
`data` (at least the loader keys of `LoaderConfig`), `optim`, `train`, `checkpoint` and `run`. A job's config
subclasses it, narrowing a section to a subclass of the shared one (other defaults, more keys) and adding its own
sections: PretrainConfig adds `loss`, phileo.bench.config.FinetuneConfig adds `finetune` (epochs, early stopping).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Literal, Mapping, Optional, TypeVar

from phileo.config import ConfigError, from_dict, parse_override, read_yaml_mapping, set_key, to_dict, validate

Strategy = Literal["ddp", "zero1", "zero2", "zero3"]
Precision = Literal["fp32", "bf16", "fp16", "auto"]
Recipe = Literal["default", "published"]


@dataclass
class ModelConfig:
    """Which registered model to train (phileo.models.create_model(name, **overrides))."""

    name: str = "phileo_cnn_44m"
    # Config fields of the preset to change, by their published names (e.g. {img_size: 64}).
    overrides: dict[str, Any] = field(default_factory=dict)
    # Activation checkpointing of the repeated blocks: ~30 % more compute for much less activation memory.
    grad_checkpointing: bool = False


@dataclass
class LoaderConfig:
    """The DataLoader settings the Trainer reads from any job's `data` section."""

    batch_size: int = 4  # per process (per GPU); the global batch is batch_size × grad_accum_steps × world size
    num_workers: int = 4  # DataLoader worker processes per rank (HDF5 reads need processes, not threads)
    pin_memory: bool = True  # only used on GPU
    prefetch_factor: int = 2  # batches each worker keeps ready
    eval_batch_size: int = 0  # per process, for the task's evaluation and test sets (0: batch_size)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1 (per process), got {self.batch_size}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor < 1:
            raise ConfigError(f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if self.eval_batch_size < 0:
            raise ConfigError(f"data.eval_batch_size must be >= 0 (0 = data.batch_size), got {self.eval_batch_size}")


@dataclass
class DataConfig(LoaderConfig):
    """The pretraining shards (the folder holding manifest.json, written by preprocess/majortom_to_h5.py)."""

    root: str = ""
    patch_size: int = 128
    # Crops are a pure function of (data.seed, epoch, item): keep it fixed for a run to resume exactly.
    seed: int = 0
    # Every start checks each chunk file's size and checksum against manifest.json, spread over all ranks (each
    # byte read once per job; cost in benchmarks/README.md, "Chunk verification"). false: trust the files, e.g.
    # right after a --verify pass of a large set; a damaged chunk then fails at its first read (ChunkReadError).
    verify_chunks: bool = True
    # A chunk that fails verification: "stop" (every rank raises BadChunkError naming the chunks and the fix,
    # before the first step) or "skip" (its cells are left out; a warning per chunk in log.txt, the count as the
    # scalar data/bad_chunks).
    on_bad_chunk: Literal["stop", "skip"] = "stop"

    def validate(self) -> None:
        super().validate()
        if self.patch_size < 8 or self.patch_size % 2:
            raise ConfigError(f"data.patch_size must be an even number >= 8, got {self.patch_size}")


@dataclass
class LossConfig:
    """The foundation loss: term weights and how the two corrupted views are made (see phileo.train.loss)."""

    reconstruction: float = 1.0
    coords: float = 1.0
    clouds: float = 100.0
    buildings: float = 100.0
    landcover: float = 1.0
    embedding_positive: float = 1.5
    embedding_negative: float = 0.5
    embedding_distance: float = 1.0
    # Random erasing: a rectangle covering this fraction range of each view is replaced by random values.
    erase_fraction: list[float] = field(default_factory=lambda: [0.25, 0.5])
    flips: bool = True

    def validate(self) -> None:
        lo_hi = self.erase_fraction
        if len(lo_hi) != 2 or not 0.0 <= lo_hi[0] <= lo_hi[1] < 1.0:
            raise ConfigError(f"loss.erase_fraction must be [min, max] with 0 <= min <= max < 1, got {lo_hi}")
        for name in ("reconstruction", "coords", "clouds", "buildings", "landcover", "embedding_positive",
                     "embedding_negative", "embedding_distance"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss.{name} is a weight and must be >= 0, got {getattr(self, name)}")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay, by optimizer step."""

    lr: float = 1e-4  # peak LR before world-size scaling (reference: 1e-4 CNN, 3e-5 ViT)
    # Scale the peak LR with the number of processes: "sqrt" is what the reference did (lr · √world_size),
    # "linear" is the usual rule for large batches, "none" keeps `lr` as given.
    lr_scaling: Literal["none", "sqrt", "linear"] = "none"
    weight_decay: float = 0.01
    # The reference decayed every parameter; exempting biases and norm gains is the common modern choice.
    decay_norm_and_bias: bool = True
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 1000
    # "linear": from lr/warmup_steps up to lr. "geometric" (the published fine-tuning): warmup_steps cut into
    # warmup_stages equal stages, the first at lr / warmup_gamma**warmup_stages, each next one warmup_gamma
    # times higher, then lr.
    warmup: Literal["linear", "geometric"] = "linear"
    warmup_gamma: float = 10.0
    warmup_stages: int = 5
    min_lr_ratio: float = 0.0  # the cosine ends at lr · min_lr_ratio (1.0: constant after the warm-up)

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup == "geometric" and (self.warmup_gamma <= 1.0 or self.warmup_stages < 1):
            raise ConfigError(f"optim.warmup=geometric needs optim.warmup_gamma > 1 and optim.warmup_stages >= 1, "
                              f"got {self.warmup_gamma} and {self.warmup_stages}")


@dataclass
class TrainConfig:
    """The training loop: length, parallel strategy, precision, accumulation, clipping, stopping."""

    steps: int = 1000  # optimizer steps in the whole run (across requeues)
    strategy: Strategy = "ddp"
    # DeepSpeed ZeRO CPU offload: "optimizer" (zero1-3) or "optimizer_and_params" (zero3 only).
    offload: Literal["none", "optimizer", "optimizer_and_params"] = "none"
    seed: int = 0
    # "auto": bf16 on GPUs that support it, fp32 otherwise (CPU defaults to fp32; bf16 can be asked for).
    # "fp16": fp16 autocast with a gradient scaler (the published fine-tuning); CUDA and ddp only.
    precision: Precision = "auto"
    grad_accum_steps: int = 1
    grad_clip_norm: float = 1.0  # 0 turns clipping off (the norm is still logged)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # End this launch with a checkpoint after this many steps (status "preempted"); the next launch goes on.
    # For chaining short jobs and for tests; 0 = no limit.
    max_steps_per_launch: int = 0
    # Process-group timeout: a rank that hangs in a collective fails after this long instead of forever.
    dist_timeout_s: int = 900
    # Signals that ask for a checkpoint and a clean stop at the next step boundary (SLURM sends USR2 before the
    # time limit when asked with --signal, and TERM at the limit or on scancel/preemption).
    stop_signals: list[str] = field(default_factory=lambda: ["SIGUSR2", "SIGTERM"])
    eval_every_steps: int = 0  # how often the task's evaluate() hook runs (0 = never); fine-tuning uses it
    # Early stopping on the training loss (the published pretraining): stop when the mean training loss of an
    # epoch (one pass of this rank over its training data) has not been lower than the best one by more than
    # early_stop_min_delta for this many epochs. 0 = off.
    early_stop_patience_epochs: int = 0
    early_stop_min_delta: float = 0.0

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"train.steps must be >= 1 (optimizer steps), got {self.steps}")
        if self.grad_accum_steps < 1:
            raise ConfigError(f"train.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.grad_clip_norm < 0:
            raise ConfigError(f"train.grad_clip_norm must be >= 0 (0 = off), got {self.grad_clip_norm}")
        if self.offload != "none" and self.strategy == "ddp":
            raise ConfigError(f"train.offload={self.offload} needs a ZeRO strategy (train.strategy=zero1|zero2|"
                              f"zero3); DDP keeps everything on the GPU")
        if self.offload == "optimizer_and_params" and self.strategy != "zero3":
            raise ConfigError("train.offload=optimizer_and_params needs train.strategy=zero3 (only ZeRO-3 "
                              "partitions the parameters); use train.offload=optimizer with zero1/zero2")
        if self.max_steps_per_launch < 0:
            raise ConfigError(f"train.max_steps_per_launch must be >= 0 (0 = no limit), "
                              f"got {self.max_steps_per_launch}")
        if self.dist_timeout_s < 10:
            raise ConfigError(f"train.dist_timeout_s must be >= 10 seconds, got {self.dist_timeout_s}")
        if self.eval_every_steps < 0:
            raise ConfigError(f"train.eval_every_steps must be >= 0, got {self.eval_every_steps}")
        if self.early_stop_patience_epochs < 0 or self.early_stop_min_delta < 0:
            raise ConfigError(f"train.early_stop_patience_epochs (0 = off) and train.early_stop_min_delta must be "
                              f">= 0, got {self.early_stop_patience_epochs} and {self.early_stop_min_delta}")
        if self.precision == "fp16" and self.strategy != "ddp":
            raise ConfigError(f"train.precision=fp16 (with a gradient scaler) runs with train.strategy=ddp only; "
                              f"use train.precision=bf16 with {self.strategy}")
        import signal
        for name in self.stop_signals:
            if not isinstance(getattr(signal, name, None), signal.Signals):
                raise ConfigError(f"train.stop_signals: {name!r} is not a signal name (e.g. SIGUSR2, SIGTERM)")


@dataclass
class CheckpointConfig:
    """When to write checkpoints under run.dir/checkpoints/ and how many to keep."""

    every_steps: int = 1000  # also written on a stop signal and at the last step
    keep_last: int = 3

    def validate(self) -> None:
        if self.every_steps < 1:
            raise ConfigError(f"checkpoint.every_steps must be >= 1, got {self.every_steps}")
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be >= 1 (the newest is needed to resume), "
                              f"got {self.keep_last}")


@dataclass
class RunConfig:
    """The run folder (on shared scratch) and what is logged into it."""

    dir: str = "runs/pretrain"
    log_every_steps: int = 10  # scalars to TensorBoard, log.txt and metrics.jsonl
    image_every_steps: int = 500  # input / corrupted view / reconstruction grids (0 = never)
    tensorboard: bool = True
    # Peak dense TFLOP/s of one device in the training precision, for the MFU estimate. Unset: taken from a
    # table of known GPUs (A100, H100, H200) for bf16; MFU is not reported on CPU or unknown devices.
    peak_tflops_per_device: Optional[float] = None
    # A rank with no finished step for this long writes its stacks to run.dir/stacks/ and exits 1, so the job ends
    # and is requeued (0 = off). Below NCCL's 600 s watchdog and the 900 s process-group timeout; above the
    # slowest step, evaluation or checkpoint save (the timer is re-armed around each).
    hang_timeout_s: float = 480.0

    def validate(self) -> None:
        if self.hang_timeout_s < 0:
            raise ConfigError(f"run.hang_timeout_s must be >= 0 seconds (0 = no watchdog), got {self.hang_timeout_s}")
        if not self.dir:
            raise ConfigError("run.dir must be set (the run folder, on shared scratch for multi-node jobs)")
        if self.log_every_steps < 1:
            raise ConfigError(f"run.log_every_steps must be >= 1, got {self.log_every_steps}")
        if self.image_every_steps < 0:
            raise ConfigError(f"run.image_every_steps must be >= 0 (0 = never), got {self.image_every_steps}")
        if self.peak_tflops_per_device is not None and self.peak_tflops_per_device <= 0:
            raise ConfigError(f"run.peak_tflops_per_device must be > 0 or unset, got {self.peak_tflops_per_device}")


@dataclass
class JobConfig:
    """The sections every training job has (what the Trainer reads); saved as run.dir/config.yaml.

    recipe: the preset layer build_config put between the defaults and the user's file and flags ("default": none;
    "published": the published code's hyperparameters, phileo.train.recipes)."""

    job_kind: ClassVar[str] = "job"  # which presets of phileo.train.recipes apply
    recipe: Recipe = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: LoaderConfig = field(default_factory=LoaderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)



@dataclass
class PretrainConfig(JobConfig):
    """The whole pretraining job: the shared sections with the pretraining data, plus the loss."""

    job_kind: ClassVar[str] = "pretrain"
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)


C = TypeVar("C")


def build_config(schema: type[C], config_file: str | os.PathLike | None = None,
                 overrides: Iterable[str] | Mapping[str, Any] = (), resume_dir: str | os.PathLike | None = None,
                 base: Mapping[str, Any] | None = None, recipe: str | None = None,
                 flags: Mapping[str, Any] | None = None) -> C:
    """The one builder of a job config, in layers, each over the one before: `schema`'s defaults; `base` (a
    nested mapping, e.g. site defaults); the recipe's preset (phileo.train.recipes: `recipe`, else the `recipe`
    key the layers above it or below it set, for the model.name they set); `config_file` (YAML) or, with
    `resume_dir`, that run folder's config.yaml; `flags` (a launcher's flags as {dotted.key: value}); then
    `overrides` (key=value strings or a {dotted.key: value} mapping). With resume_dir, run.dir is that folder.
    Validated once, at the end.

    Refuses (ConfigError naming the file or key): unknown keys, bad values, an unknown recipe, a resume_dir
    without config.yaml.
    """
    from phileo.train import recipes

    overrides = dict(overrides) if isinstance(overrides, Mapping) else list(overrides)  # read twice below
    data = to_dict(schema())
    if base:
        data = _deep_merge(data, base)
    if resume_dir is not None:
        config_file = Path(resume_dir) / "config.yaml"
        if not config_file.is_file():
            raise ConfigError(f"--resume {resume_dir}: no config.yaml there; is it a run folder written by a "
                              f"PhilEO training job?")
    file_data = read_yaml_mapping(config_file) if config_file is not None else {}
    top = _layered(schema, data, file_data, config_file, flags, overrides)
    name = recipe or top.recipe
    layer = recipes.preset(schema.job_kind, name, top.model.name)
    cfg = _layered(schema, _deep_merge(data, _nested(layer)), file_data, config_file, flags, overrides)
    cfg.recipe = name
    if resume_dir is not None:
        set_key(cfg, "run.dir", str(resume_dir))
    validate(cfg)
    return cfg


def _layered(schema: type[C], data: Mapping[str, Any], file_data: Mapping[str, Any], config_file: Any,
             flags: Mapping[str, Any] | None, overrides: Iterable[str] | Mapping[str, Any]) -> C:
    """`data` with the file, the flags and the overrides on top; not validated yet (the preset may still come)."""
    try:
        cfg = from_dict(schema, _deep_merge(data, file_data))
    except ConfigError as e:
        raise ConfigError(f"{config_file or 'config'}: {e}") from None
    items = list(overrides.items()) if isinstance(overrides, Mapping) else [parse_override(o) for o in overrides]
    for k, v in [*(flags or {}).items(), *items]:
        set_key(cfg, k, v)
    return cfg


def _nested(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """{"optim.lr": 1} -> {"optim": {"lr": 1}}."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        *sections, last = key.split(".")
        node = out
        for s in sections:
            node = node.setdefault(s, {})
        node[last] = value
    return out


def _deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


__all__ = ["ModelConfig", "LoaderConfig", "DataConfig", "LossConfig", "OptimConfig", "TrainConfig",
           "CheckpointConfig", "RunConfig", "JobConfig", "PretrainConfig", "build_config", "Strategy", "Precision",
           "Recipe"]
