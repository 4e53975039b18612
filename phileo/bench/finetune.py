"""Fine-tuning a PhilEO model on a PhilEO Bench task with the n-shot protocol, on the training engine.

    python -m phileo.bench.finetune data.root=/data/phileo-downstream data.task=roads data.n_shot=100 \
        model.name=phileo_cnn_44m model.init=/weights/phileo_cnn_44m.pt run.dir=$SCRATCH/ft/cnn44m_roads_100
    python -m phileo.bench.finetune --config ft.yaml [key=value ...]
    srun --ntasks-per-node=4 python -m phileo.bench.finetune ...      # DDP over 4 GPUs (or torchrun)

Tasks: roads and building (1 output, MSE), lc (11 WorldCover classes, cross-entropy ignoring no-data pixels).
The same Trainer as pretraining runs the loop, so checkpoints, resume, the pre-timeout signal (a checkpoint and
status "preempted"), TensorBoard (loss/total, lr, perf/..., val/loss, test/<metric>) and the run folder layout
are the same. On top of it:

- the n-shot training and validation patches come from the saved selection (phileo.bench.data);
- the validation loss is measured every finetune.val_every_epochs; the weights with the lowest one are kept
  (inside every checkpoint, so a requeued run keeps them) and training stops early after
  finetune.patience_epochs epochs without improvement;
- at the end the best weights are evaluated on the full test set (all *_test_s2.npy patches, split among the
  ranks, metrics summed across them) and written to run.dir/best_model.pt;
- run.dir/result.json (written last, atomically: its presence means "finished") holds the test metrics, the
  best validation loss and epoch, the exact config and the n-shot index file's path and sha256.

Exit status (phileo.exit_codes): 0 completed, 75 stopped by the pre-timeout signal with a checkpoint (run again
to continue), 1 failed, 2 bad command line or config.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from phileo.config import ConfigError, apply_overrides, load_config, to_dict, validate
from phileo.bench.data import (IGNORE_INDEX, NUM_LC_CLASSES, WORLDCOVER_NAMES, BenchSplits, nshot_datasets)
from phileo.fsutil import atomic_write_json, make_group_readable, read_json
from phileo.train import checkpoint as ckpt_io
from phileo.train import dist
from phileo.train.cli import add_config_args, run_config_job
from phileo.bench.metrics import RegressionMetrics, SegmentationMetrics
from phileo.train.engine import Task, Trainer, TrainResult
from phileo.bench.config import FinetuneConfig
from phileo.train.signals import StopFlag, ignore_signals

log = logging.getLogger("phileo.train")

RESULT_FILE = "result.json"
BEST_MODEL_FILE = "best_model.pt"
RGB = (2, 1, 0)  # B04, B03, B02 in the bench band order


def num_outputs(task: str) -> int:
    return NUM_LC_CLASSES if task == "lc" else 1


def task_loss(task: str, outputs: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """MSE for roads/building (outputs and labels (B, 1, S, S)); cross-entropy over 11 classes for lc (outputs
    (B, 11, S, S) logits, labels (B, S, S) class indices, IGNORE_INDEX pixels skipped)."""
    outputs = outputs.float()
    if task == "lc":
        return F.cross_entropy(outputs, labels, ignore_index=IGNORE_INDEX, reduction=reduction)
    return F.mse_loss(outputs, labels.float(), reduction=reduction)


def _count(task: str, labels: torch.Tensor) -> int:
    return int((labels != IGNORE_INDEX).sum()) if task == "lc" else labels.numel()


def resolve_init(init: str) -> Path | None:
    """model.init -> the path load_pretrained reads: None for "scratch"; a pretraining run folder becomes its
    newest checkpoint folder. Refuses a path that does not exist and a run folder without checkpoints."""
    if init == "scratch":
        return None
    p = Path(init)
    if not p.exists():
        raise FileNotFoundError(f"model.init={init}: no such file or folder (a published weights file, a "
                                f"checkpoint folder or model.pt, a pretraining run folder, or 'scratch')")
    if p.is_dir() and (p / ckpt_io.CHECKPOINTS).is_dir():
        latest = ckpt_io.latest_checkpoint(p)
        if latest is None:
            raise FileNotFoundError(f"model.init={init} is a run folder without a complete checkpoint in "
                                    f"{p / ckpt_io.CHECKPOINTS}; wait for the pretraining to save one")
        return latest
    return p


def shard(dataset: Dataset, info: dist.DistInfo) -> Dataset:
    """This rank's share for evaluation: items rank, rank + world, ... (no padding, so sums are exact)."""
    if info.world_size == 1:
        return dataset
    return Subset(dataset, list(range(info.global_rank, len(dataset), info.world_size)))  # type: ignore[arg-type]


def _worker_ignores_signals(signal_names: list[str], worker_id: int) -> None:
    ignore_signals(signal_names)


def _eval_loader(dataset: Dataset, cfg: FinetuneConfig, info: dist.DistInfo) -> DataLoader:
    workers = min(cfg.data.num_workers, 2)  # evaluation sets are small or read once: few workers suffice
    # SLURM signals every process of the step: workers must not die of USR2 while the main process checkpoints.
    init = functools.partial(_worker_ignores_signals, list(cfg.train.stop_signals)) if workers else None
    return DataLoader(shard(dataset, info), batch_size=cfg.data.eval_batch_size or cfg.data.batch_size,
                      shuffle=False, num_workers=workers, pin_memory=info.device.startswith("cuda"),
                      worker_init_fn=init)


def _autocast(device: torch.device, bf16: bool):
    import contextlib

    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


@torch.no_grad()
def validation_loss(model: nn.Module, dataset: Dataset, task: str, cfg: FinetuneConfig, info: dist.DistInfo,
                    bf16: bool) -> float:
    """Mean per-pixel loss over the whole validation set (all ranks' shares), the same on every rank."""
    device = torch.device(info.device)
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64)
    try:
        for batch in _eval_loader(dataset, cfg, info):
            x, y = batch["image"].to(device), batch["label"].to(device)
            with _autocast(device, bf16):
                out = model(x)
            sums += torch.tensor([float(task_loss(task, out, y, reduction="sum")), _count(task, y)],
                                 dtype=torch.float64)
    finally:
        model.train(was_training)
    sums = dist.all_reduce_(sums.to(device)).cpu()
    return float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")


def test_metrics(model: nn.Module, dataset: Dataset, task: str, cfg: FinetuneConfig, info: dist.DistInfo,
                 bf16: bool, stop: StopFlag | None = None) -> dict[str, Any] | None:
    """Test-set metrics of `model` (RegressionMetrics / SegmentationMetrics) summed over all ranks' shares.

    Returns None when a stop signal arrived meanwhile (checked between batches, agreed by all ranks), so that
    the caller can exit for a requeue instead of being killed halfway.
    """
    device = torch.device(info.device)
    metric = (SegmentationMetrics(NUM_LC_CLASSES, IGNORE_INDEX, WORLDCOVER_NAMES) if task == "lc"
              else RegressionMetrics(threshold=0.5))
    model.eval()
    loader = _eval_loader(dataset, cfg, info)
    n_batches = torch.tensor([float(len(loader))], device=device)
    # Ranks may hold one batch more or less; all must take part in the same number of stop votes.
    n_max = int(dist.all_reduce_(n_batches, "max").item())
    it = iter(loader)
    with torch.no_grad():
        for _ in range(n_max):
            flag = torch.tensor([float(stop is not None and stop.requested)], device=device)
            if dist.all_reduce_(flag, "max").item() > 0:
                return None
            batch = next(it, None)
            if batch is None:
                continue
            x, y = batch["image"].to(device), batch["label"].to(device)
            with _autocast(device, bf16):
                out = model(x)
            metric.update(out.float(), y)
    metric.all_reduce()
    return metric.compute()


class BenchTask(Task):
    """One PhilEO Bench task for the Trainer: the downstream model, the n-shot training set, the task loss,
    validation with early stopping, and the best weights as part of the task state."""

    split = "world"
    name = "finetune"

    def __init__(self, cfg: FinetuneConfig, splits: BenchSplits, info: dist.DistInfo, steps_per_epoch: int):
        self.cfg, self.splits, self.info = cfg, splits, info
        self.task = cfg.data.task
        self.steps_per_epoch = steps_per_epoch
        self.init_report: dict[str, Any] | None = None
        self.best_val_loss = math.inf
        self.best_step = 0
        # Every rank keeps its own copy (identical under DDP): nothing to broadcast when testing.
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[list[float]] = []  # [epoch, val loss]
        self._stop = False

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    # -- model and data
    def build_model(self) -> nn.Module:
        from phileo.models import create_downstream_model, load_pretrained

        m = self.cfg.model
        overrides = dict(m.overrides)
        if m.grad_checkpointing:
            overrides["grad_checkpointing"] = True
        model = create_downstream_model(m.name, num_outputs=num_outputs(self.task), freeze_encoder=m.freeze_encoder,
                                        **overrides)
        img_size = getattr(getattr(model, "config", None), "img_size", None)
        patch = self.splits.train.read(0)[0].shape[0]
        if img_size is not None and img_size != patch:
            raise ConfigError(f"model {m.name} is built for {img_size} px inputs but the patches in {self.cfg.data.root} "
                              f"are {patch} px; set model.overrides={{img_size: {patch}}} (or use matching data)")
        path = resolve_init(m.init)
        if path is not None:
            report = load_pretrained(model, path)
            self.init_report = {"source": str(path), "format": report.format, "mode": report.mode,
                                "step": report.step, "loaded": len(report.loaded),
                                "initialised": len(report.initialised), "ignored": len(report.ignored)}
            if self.info.is_main:
                log.info("initialised from %s: %s", path, report.summary())
        else:
            self.init_report = {"source": "scratch"}
        return model

    def train_dataset(self, info: dist.DistInfo) -> Dataset:
        return self.splits.train

    def compute_loss(self, outputs: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = task_loss(self.task, outputs, batch["label"])
        return loss, {self.task: loss.detach()}

    # -- validation and early stopping
    def evaluate(self, trainer: Trainer, step: int) -> dict[str, float] | None:
        val = validation_loss(trainer.model, self.splits.val, self.task, self.cfg, self.info, trainer.bf16)
        epoch = self.epoch_of(step)
        self.history.append([epoch, val])
        if math.isfinite(val) and val < self.best_val_loss - self.cfg.finetune.min_delta:
            self.best_val_loss, self.best_step = val, step
            self.best_state = trainer.model_state_dict()
        since = epoch - self.epoch_of(self.best_step) if self.best_step else epoch
        self._stop = since >= self.cfg.finetune.patience_epochs
        return {"val/loss": val, "val/best_loss": self.best_val_loss if math.isfinite(self.best_val_loss) else val,
                "epoch": float(epoch)}

    def should_stop(self) -> bool:
        return self._stop

    def state_dict(self) -> dict[str, Any]:
        return {"best_val_loss": self.best_val_loss, "best_step": self.best_step, "history": self.history,
                "best_state": self.best_state, "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        self.best_val_loss = float(state["best_val_loss"])
        self.best_step = int(state["best_step"])
        self.history = [list(h) for h in state["history"]]
        self.best_state = state.get("best_state")

    # -- logging
    def images(self, outputs: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        from phileo.train.pretrain import image_grid

        n = min(4, batch["image"].shape[0])
        x = batch["image"][:n].float()
        if self.cfg.data.normalisation == "reflectance":
            rgb = (x[:, list(RGB)] * 3.5).clamp(0, 1)
        else:  # standardised or raw: stretch each image to its own range
            rgb = x[:, list(RGB)]
            lo, hi = rgb.amin(dim=(1, 2, 3), keepdim=True), rgb.amax(dim=(1, 2, 3), keepdim=True)
            rgb = (rgb - lo) / (hi - lo + 1e-6)
        if self.task == "lc":
            label = batch["label"][:n].clamp(min=0).float() / (NUM_LC_CLASSES - 1)
            pred = outputs[:n].argmax(1).float() / (NUM_LC_CLASSES - 1)
            label, pred = label[:, None], pred[:, None]
        else:
            label, pred = batch["label"][:n].float(), outputs[:n].float().clamp(0, 1)
        gray = lambda t: t.expand(-1, 3, -1, -1)  # noqa: E731
        return {"images/input_label_prediction": image_grid([rgb, gray(label), gray(pred)])}

    def hparams(self) -> dict[str, Any]:
        m, d = self.cfg.model, self.cfg.data
        return {"model": m.name, "init": m.init, "freeze_encoder": m.freeze_encoder, "task": d.task,
                "n_shot": d.n_shot, "nshot_seed": d.nshot_seed}


@dataclass
class FinetuneResult:
    """How run_finetuning ended: status "completed" (result.json written), "preempted" (checkpoint saved, run
    again to continue) or "failed" (message says why); result: the result.json content when completed."""

    status: str
    run_dir: Path
    result: dict[str, Any] | None = None
    message: str = ""
    train: TrainResult | None = None


def derive_steps(cfg: FinetuneConfig, n_train: int, world_size: int) -> tuple[FinetuneConfig, int]:
    """Sets train.steps, train.eval_every_steps, optim.warmup_steps and checkpoint.every_steps from the epoch
    settings; returns (config, steps per epoch). One epoch = ceil(n_train / (batch_size x world_size)) steps."""
    per_step = cfg.data.batch_size * cfg.train.grad_accum_steps * world_size
    steps_per_epoch = max(1, math.ceil(n_train / per_step))
    ft = cfg.finetune
    return apply_overrides(cfg, {
        "train.steps": ft.max_epochs * steps_per_epoch,
        "train.eval_every_steps": ft.val_every_epochs * steps_per_epoch,
        "optim.warmup_steps": ft.warmup_epochs * steps_per_epoch,
        "checkpoint.every_steps": ft.checkpoint_every_epochs * steps_per_epoch,
    }), steps_per_epoch


def _best_from_checkpoint(run_dir: Path) -> dict[str, Any]:
    latest = ckpt_io.latest_checkpoint(run_dir)
    if latest is None:
        raise FileNotFoundError(f"{run_dir} is marked DONE but has no checkpoint to take the best weights from; "
                                f"delete {run_dir / ckpt_io.DONE} to train again")
    return ckpt_io.load_file(latest / "trainer.pt", "trainer state").get("task", {})


def run_finetuning(cfg: FinetuneConfig, info: dist.DistInfo | None = None) -> FinetuneResult:
    """Fine-tunes (or resumes, or finds finished) the run described by `cfg` in this process; see module doc.

    The distributed layout comes from the environment unless `info` is given. A run folder with a result.json
    returns at once. Refuses a config without data.root, and a model whose input size does not match the data.
    """
    t0 = time.time()
    validate(cfg)
    run_dir = Path(cfg.run.dir)
    if (run_dir / RESULT_FILE).is_file():
        result = read_json(run_dir / RESULT_FILE, "fine-tuning result")
        if result.get("status") == "completed":
            log.info("%s already has its result: nothing to do", run_dir)
            return FinetuneResult("completed", run_dir, result, "already complete")
    if not cfg.data.root:
        raise ConfigError("data.root is not set: point it at the PhilEO-downstream folder (the *_s2.npy files)")
    info = info or dist.init_distributed(device=cfg.train.device, timeout_s=cfg.train.dist_timeout_s)
    splits = nshot_datasets(cfg.data.root, cfg.data.task, cfg.data.n_shot, seed=cfg.data.nshot_seed,
                            val_ratio=cfg.data.val_ratio, index_dir=cfg.data.nshot_index_dir or None,
                            normalisation=cfg.data.normalisation, augment=cfg.data.augment,
                            published_index=cfg.data.nshot_index or None)
    cfg, steps_per_epoch = derive_steps(cfg, len(splits.train), info.world_size)
    task = BenchTask(cfg, splits, info, steps_per_epoch)
    trainer = Trainer(cfg, task, info)
    if info.is_main:
        log.info("fine-tuning %s (init %s) on %s, n=%d: %d train / %d val / %d test patches, %d steps per epoch",
                 cfg.model.name, cfg.model.init, cfg.data.task, cfg.data.n_shot, len(splits.train),
                 len(splits.val), len(splits.test), steps_per_epoch)
    train_result = trainer.fit()
    if train_result.status != "completed":
        return FinetuneResult(train_result.status, run_dir, message=train_result.message, train=train_result)

    # The Trainer closed its log handlers; the test phase logs into the same log.txt.
    from phileo.train.metrics import setup_logging, teardown_logging

    handlers = setup_logging(run_dir, info.global_rank)
    try:
        return _test_and_report(cfg, run_dir, task, trainer, splits, train_result, info, t0)
    finally:
        teardown_logging(handlers)


def _test_and_report(cfg: FinetuneConfig, run_dir: Path, task: "BenchTask", trainer: Trainer, splits: BenchSplits,
                     train_result: TrainResult, info: dist.DistInfo, t0: float) -> FinetuneResult:
    model = trainer.model
    if model is None:  # fit() found the run DONE (a crash after training): rebuild and take the best weights
        task.load_state_dict(_best_from_checkpoint(run_dir))
        model = task.build_model().to(info.device)
        if task.best_state is None:
            model.load_state_dict(ckpt_io.load_model_state(ckpt_io.latest_checkpoint(run_dir)))
    if task.best_state is not None:
        model.load_state_dict(task.best_state)
    else:
        log.warning("no finite validation loss was ever measured: testing the final weights")
    stop = StopFlag(list(cfg.train.stop_signals))
    stop.install()
    try:
        metrics = test_metrics(model, splits.test, cfg.data.task, cfg, info, trainer.bf16, stop)
    finally:
        stop.restore()
    if metrics is None:
        log.info("stop signal during the test evaluation: run again to evaluate (training is complete)")
        return FinetuneResult("preempted", run_dir, message="stop signal during test evaluation",
                              train=train_result)

    result = None
    if info.is_main:
        result = _write_result(cfg, run_dir, task, splits, metrics, train_result, info, model, time.time() - t0)
    dist.barrier()
    return FinetuneResult("completed", run_dir, result, train_result.message, train_result)


def _write_result(cfg: FinetuneConfig, run_dir: Path, task: BenchTask, splits: BenchSplits,
                  metrics: dict[str, Any], train_result: TrainResult, info: dist.DistInfo, model: nn.Module,
                  wall_time_s: float) -> dict[str, Any]:
    from phileo.models import save_published
    from phileo.train.metrics import MetricsWriter, read_metrics

    done = ckpt_io.read_done(run_dir) or {}
    final_step = int(done.get("step", train_result.step))
    save_published(model, run_dir / BEST_MODEL_FILE, step=task.best_step, val_loss=task.best_val_loss,
                   config=to_dict(cfg))
    test_scalars = {f"test/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))
                    and not isinstance(v, bool)}
    # metrics.jsonl keeps the later line of a step logged twice: repeat that step's training scalars with the
    # test ones so nothing is shadowed. TensorBoard gets only the new tags.
    earlier = {k: v for k, v in read_metrics(run_dir).get(final_step, {}).items() if k != "time"}
    jsonl = MetricsWriter(run_dir, True, tensorboard=False)
    jsonl.scalars(final_step, {**earlier, **test_scalars})
    jsonl.close()
    if cfg.run.tensorboard:  # only the new tags: the step's training scalars are already in the event files
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(run_dir / "tensorboard")) as tb:
            for k, v in test_scalars.items():
                tb.add_scalar(k, float(v), final_step)
        for f in (run_dir / "tensorboard").iterdir():
            make_group_readable(f)
    best = task.best_val_loss if math.isfinite(task.best_val_loss) else None
    result = {
        "status": "completed",
        "task": cfg.data.task, "n_shot": cfg.data.n_shot, "model": cfg.model.name, "init": cfg.model.init,
        "freeze_encoder": cfg.model.freeze_encoder, "lr": cfg.optim.lr, "seed": cfg.train.seed,
        "best_val_loss": best, "best_step": task.best_step, "best_epoch": task.epoch_of(task.best_step),
        "epochs_run": task.epoch_of(final_step), "steps": final_step,
        "stopped_early": bool(done.get("stopped_early", False)), "steps_per_epoch": task.steps_per_epoch,
        "val_history": task.history,
        "test": metrics, "test_patches": len(splits.test), "test_skipped_files": splits.test.skipped,
        "n_train": len(splits.train), "n_val": len(splits.val),
        "nshot_index": {"path": str(splits.index_path), "sha256": splits.index_sha256},
        "init_report": task.init_report, "world_size": info.world_size, "wall_time_s": round(wall_time_s, 1),
        "config": to_dict(cfg),
    }
    atomic_write_json(run_dir / RESULT_FILE, result)
    headline = {k: metrics[k] for k in ("rmse", "mae", "f1", "overall_accuracy", "miou") if k in metrics}
    log.info("test %s: %s (best validation loss %s at epoch %d); wrote %s", cfg.data.task,
             ", ".join(f"{k} {v:.4g}" for k, v in headline.items()), best, result["best_epoch"],
             run_dir / RESULT_FILE)
    return result


def build_config(config_path: str | None, overrides: Sequence[str]) -> FinetuneConfig:
    if config_path:
        return load_config(FinetuneConfig, config_path, overrides)
    return apply_overrides(FinetuneConfig(), overrides)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m phileo.bench.finetune",
        description="Fine-tune a PhilEO model on a PhilEO Bench task (n-shot protocol; resumes from run.dir).",
        epilog="Overrides are key=value, e.g. data.root=/data/phileo-downstream data.task=lc data.n_shot=100 "
               "model.name=phileo_vit_100m model.init=/weights/phileo_vit_100m.pt model.freeze_encoder=true "
               "optim.lr=1e-4 run.dir=$SCRATCH/ft/run1. Keys: see phileo/bench/config.py.")
    add_config_args(parser, "model, data, finetune, optim, train, checkpoint, run")
    args = parser.parse_args(argv)
    return run_config_job(
        lambda: build_config(args.config, args.overrides), run_finetuning, args.print_config,
        summary=lambda r: f"{r.status}: {r.run_dir}" + (f" ({r.message})" if r.message else ""))


if __name__ == "__main__":
    sys.exit(main())
