"""Fine-tuning a PhilEO model on a PhilEO Bench task with the n-shot protocol, on the training engine.

    python -m phileo.bench.finetune data.root=/data/phileo-downstream data.task=roads data.n_shot=100 \
        model.name=phileo_cnn_44m model.init=/weights/phileo_cnn_44m.pt run.dir=$SCRATCH/ft/cnn44m_roads_100
    python -m phileo.bench.finetune --config ft.yaml [key=value ...]
    srun --ntasks-per-node=4 python -m phileo.bench.finetune ...      # DDP over 4 GPUs (or torchrun)

Tasks: roads and building (1 output, MSE), lc (11 WorldCover classes, cross-entropy ignoring no-data pixels).
Fine-tuning is a Task (BenchTask: model, n-shot batches, task loss, validation and test) plus its recipe
(FinetuneConfig); the engine's Trainer runs it, so the loop, checkpoints and resume, the pre-timeout signal (a
checkpoint and status "preempted"), log.txt, metrics.jsonl and TensorBoard (loss/total, lr, perf/..., val/loss,
test/<metric>) and the run folder layout are the engine's, written by the engine's components. The task adds:

- the n-shot training and validation patches come from the saved selection (phileo.bench.data);
- the validation loss is measured every finetune.val_every_epochs; the weights with the lowest one are kept
  (inside every checkpoint, so a requeued run keeps them) and training stops early after
  finetune.patience_epochs epochs without improvement;
- once training is complete the best weights are evaluated on the full test set (Task.test: all *_test_s2.npy
  patches, split among the ranks, metrics summed across them) and written to run.dir/best_model.pt;
- run.dir/result.json (written last, atomically: its presence means "finished") holds the test metrics, the
  best validation loss and epoch, the exact config and the n-shot index file's path and sha256.

Exit status (phileo.exit_codes): 0 completed, 75 stopped by the pre-timeout signal with a checkpoint (run again
to continue), 1 failed, 2 bad command line or config.
"""

from __future__ import annotations

import argparse
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
from torch.utils.data import Dataset

from phileo.bench.config import FinetuneConfig
from phileo.bench.data import IGNORE_INDEX, NUM_LC_CLASSES, WORLDCOVER_NAMES, BenchSplits, nshot_datasets
from phileo.bench.metrics import RegressionMetrics, SegmentationMetrics
from phileo.config import ConfigError, apply_overrides, to_dict, validate
from phileo.fsutil import atomic_write_json, read_json
from phileo.train import checkpoint as ckpt_io
from phileo.train import dist
from phileo.train.cli import add_config_args, run_config_job
from phileo.train.config import build_config
from phileo.train.engine import Task, Trainer, TrainResult
from phileo.train.evaluate import Evaluator
from phileo.train.loader import DataLayout
from phileo.train.stop import EarlyStopping, steps_per_epoch

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


class BenchTask(Task):
    """One PhilEO Bench task for the Trainer: the downstream model, the n-shot training set, the task loss,
    validation with early stopping, the best weights as part of the task state, and the test of the best
    weights with result.json and best_model.pt as the task's outputs. t0: when the job started (wall time)."""

    split = "world"
    name = "finetune"
    has_test = True

    def __init__(self, cfg: FinetuneConfig, splits: BenchSplits, info: dist.DistInfo, steps_per_epoch: int,
                 t0: float | None = None):
        self.cfg, self.splits, self.info = cfg, splits, info
        self.task = cfg.data.task
        self.steps_per_epoch = steps_per_epoch
        self.t0 = time.time() if t0 is None else t0
        self.init_report: dict[str, Any] | None = None
        # Counted in steps: validation runs at whole epochs, so this is patience_epochs epochs exactly.
        self.early = EarlyStopping(cfg.finetune.patience_epochs * steps_per_epoch, cfg.finetune.min_delta)
        # Every rank keeps its own copy (identical under DDP): nothing to broadcast when testing.
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[list[float]] = []  # [epoch, val loss]
        self.test_metrics: dict[str, Any] | None = None
        self.result: dict[str, Any] | None = None  # result.json's content, on global rank 0
        self._tested_model: nn.Module | None = None

    @property
    def best_val_loss(self) -> float:
        return self.early.best

    @property
    def best_step(self) -> int:
        return self.early.best_at

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
                                        freeze_stem=m.freeze_stem, **overrides)
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

    # -- validation, early stopping and test
    def _loss_sum(self, outputs: torch.Tensor, batch: dict[str, Any]) -> tuple[float, int]:
        return float(task_loss(self.task, outputs, batch["label"], reduction="sum")), _count(self.task, batch["label"])

    def evaluate(self, evaluator: Evaluator, step: int) -> dict[str, float] | None:
        """Mean per-pixel validation loss over the whole validation set; keeps the weights with the lowest."""
        val = evaluator.mean(self.splits.val, self._loss_sum)
        epoch = self.epoch_of(step)
        self.history.append([epoch, val])
        if self.early.update(val, step):
            self.best_state = evaluator.state_dict()
        return {"val/loss": val, "val/best_loss": self.best_val_loss if math.isfinite(self.best_val_loss) else val,
                "epoch": float(epoch)}

    def should_stop(self) -> bool:
        return self.early.should_stop

    def test(self, evaluator: Evaluator, step: int) -> dict[str, float]:
        """The best weights (the final ones if no finite validation loss was measured) on the whole test set."""
        if self.best_state is not None:
            evaluator.model.load_state_dict(self.best_state)
        else:
            log.warning("no finite validation loss was ever measured: testing the final weights")
        metric = (SegmentationMetrics(NUM_LC_CLASSES, IGNORE_INDEX, WORLDCOVER_NAMES) if self.task == "lc"
                  else RegressionMetrics(threshold=0.5))
        self.test_metrics = evaluator.metrics(self.splits.test, metric, stoppable=True)
        self._tested_model = evaluator.model
        return {f"test/{k}": v for k, v in self.test_metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def on_complete(self, run_dir: Path, result: TrainResult) -> None:
        """best_model.pt, then result.json (written last, atomically: its presence means "finished"), then the
        resume checkpoint goes (checkpoint.keep_after_completion keeps it): nothing resumes a finished run."""
        if self.info.is_main:
            self.result = _write_result(self.cfg, run_dir, self, result, self._tested_model)
            if not self.cfg.checkpoint.keep_after_completion:
                freed = ckpt_io.CheckpointManager(run_dir, 1, self.info).remove_all()
                log.info("deleted the resume checkpoint (%.1f MB; best_model.pt and result.json stay; "
                         "checkpoint.keep_after_completion=true keeps it)", freed / 1e6)

    def state_dict(self) -> dict[str, Any]:
        return {"best_val_loss": self.best_val_loss, "best_step": self.best_step, "history": self.history,
                "best_state": self.best_state, "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        self.early.load_state_dict({"best": state["best_val_loss"], "best_at": state["best_step"]})
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
        out = {"model": m.name, "init": m.init, "freeze_encoder": m.freeze_encoder, "freeze_stem": m.freeze_stem,
               "recipe": self.cfg.recipe, "task": d.task, "n_shot": d.n_shot, "nshot_seed": d.nshot_seed}
        # A sweep task (spec.json, written by phileo.bench.sweep before training): its label and place in the grid,
        # so TensorBoard's HPARAMS tab lines up the sweep.
        spec_path = Path(self.cfg.run.dir) / "spec.json"
        if spec_path.is_file():
            try:
                spec = read_json(spec_path, "sweep task spec")
                out.update({"sweep_label": spec.get("model"), "sweep_index": spec.get("index"),
                            "sweep": Path(str(spec.get("sweep") or "")).stem})
            except ValueError:
                pass
        return out

    def hparam_metrics(self) -> list[str]:
        return ["loss/total", "val/loss", f"test/{'overall_accuracy' if self.task == 'lc' else 'rmse'}"]


@dataclass
class FinetuneResult:
    """How run_finetuning ended: status "completed" (result.json written), "preempted" (checkpoint saved, run
    again to continue) or "failed" (message says why); result: the result.json content when completed (on
    global rank 0)."""

    status: str
    run_dir: Path
    result: dict[str, Any] | None = None
    message: str = ""
    train: TrainResult | None = None


def derive_steps(cfg: FinetuneConfig, n_train: int, world_size: int,
                 global_batch: int | None = None) -> tuple[FinetuneConfig, int]:
    """Sets train.steps, train.eval_every_steps, optim.warmup_steps and checkpoint.every_steps from the epoch
    settings, and for the geometric warm-up one stage per warm-up epoch (optim.warmup_stages); returns (config,
    steps per epoch). One epoch = ceil(n_train / global batch) steps; the global batch is
    batch_size x grad_accum_steps x world_size, or `global_batch`: the run's own when it resumes (kept on
    another number of processes, so the schedule stays the run's)."""
    per_epoch = steps_per_epoch(n_train, global_batch or cfg.data.batch_size * cfg.train.grad_accum_steps
                                * world_size)
    ft = cfg.finetune
    derived = {
        "train.steps": ft.max_epochs * per_epoch,
        "train.eval_every_steps": ft.val_every_epochs * per_epoch,
        "optim.warmup_steps": ft.warmup_epochs * per_epoch,
        "checkpoint.every_steps": ft.checkpoint_every_epochs * per_epoch,
    }
    if cfg.optim.warmup == "geometric" and ft.warmup_epochs > 0:
        derived["optim.warmup_stages"] = ft.warmup_epochs
    return apply_overrides(cfg, derived), per_epoch


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
    saved = ckpt_io.saved_data_layout(run_dir)  # a resumed run keeps its global batch, on any number of processes
    cfg, per_epoch = derive_steps(cfg, len(splits.train), info.world_size,
                                  DataLayout.from_dict(saved).global_batch if saved else None)
    task = BenchTask(cfg, splits, info, per_epoch, t0)
    if info.is_main:
        log.info("fine-tuning %s (init %s) on %s, n=%d: %d train / %d val / %d test patches, %d steps per epoch",
                 cfg.model.name, cfg.model.init, cfg.data.task, cfg.data.n_shot, len(splits.train),
                 len(splits.val), len(splits.test), per_epoch)
    train_result = Trainer(cfg, task, info).fit()
    return FinetuneResult(train_result.status, run_dir, task.result if train_result.status == "completed" else None,
                          train_result.message, train_result)


def _write_result(cfg: FinetuneConfig, run_dir: Path, task: BenchTask, train_result: TrainResult,
                  model: nn.Module) -> dict[str, Any]:
    from phileo.models import save_published

    final_step = train_result.step
    save_published(model, run_dir / BEST_MODEL_FILE, step=task.best_step, val_loss=task.best_val_loss,
                   config=to_dict(cfg))
    best = task.best_val_loss if math.isfinite(task.best_val_loss) else None
    splits, metrics = task.splits, task.test_metrics
    result = {
        "status": "completed",
        "task": cfg.data.task, "n_shot": cfg.data.n_shot, "model": cfg.model.name, "init": cfg.model.init,
        "freeze_encoder": cfg.model.freeze_encoder, "lr": cfg.optim.lr, "seed": cfg.train.seed,
        "best_val_loss": best, "best_step": task.best_step, "best_epoch": task.epoch_of(task.best_step),
        "epochs_run": task.epoch_of(final_step), "steps": final_step,
        "stopped_early": train_result.stopped_early, "steps_per_epoch": task.steps_per_epoch,
        "val_history": task.history,
        "test": metrics, "test_patches": len(splits.test), "test_skipped_files": splits.test.skipped,
        "n_train": len(splits.train), "n_val": len(splits.val),
        "nshot_index": {"path": str(splits.index_path), "sha256": splits.index_sha256},
        "init_report": task.init_report, "world_size": task.info.world_size,
        "wall_time_s": round(time.time() - task.t0, 1),
        "config": to_dict(cfg),
    }
    atomic_write_json(run_dir / RESULT_FILE, result)
    headline = {k: metrics[k] for k in ("rmse", "mae", "f1", "overall_accuracy", "miou") if k in metrics}
    log.info("test %s: %s (best validation loss %s at epoch %d); wrote %s", cfg.data.task,
             ", ".join(f"{k} {v:.4g}" for k, v in headline.items()), best, result["best_epoch"],
             run_dir / RESULT_FILE)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m phileo.bench.finetune",
        description="Fine-tune a PhilEO model on a PhilEO Bench task (n-shot protocol; resumes from run.dir).",
        epilog="Overrides are key=value, e.g. data.root=/data/phileo-downstream data.task=lc data.n_shot=100 "
               "model.name=phileo_vit_100m model.init=/weights/phileo_vit_100m.pt model.freeze_encoder=true "
               "optim.lr=1e-4 run.dir=$SCRATCH/ft/run1. Keys: see phileo/bench/config.py.")
    add_config_args(parser, "model, data, optim, train, checkpoint, run, finetune")
    args = parser.parse_args(argv)
    return run_config_job(
        lambda: build_config(FinetuneConfig, args.config, args.overrides, recipe=args.recipe), run_finetuning,
        args.print_config,
        summary=lambda r: f"{r.status}: {r.run_dir}" + (f" ({r.message})" if r.message else ""))


if __name__ == "__main__":
    sys.exit(main())
