"""Pretraining a PhilEO model with the foundation loss: the task, `run_pretraining`, and the command line.

    python -m phileo.train.pretrain --config pretrain.yaml [key=value ...]
    python -m phileo.train.pretrain --recipe published data.root=SHARDS model.name=phileo_vit_100m
    python -m phileo.train.pretrain --resume RUN_DIR [key=value ...]
    torchrun --nproc-per-node 4 -m phileo.train.pretrain --config pretrain.yaml data.root=/scratch/shards

The distributed layout comes from the environment (torchrun, srun, or a single process: phileo.train.dist).
Exit status (phileo.exit_codes): 0 when the run completed (run.dir/DONE), 75 when it stopped with a checkpoint
to be continued (preempted: run it again), 1 when it failed (non-finite loss) or raised, 2 for a bad command
line or config.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from phileo.config import ConfigError
from phileo.train.cli import add_config_args, run_config_job
from phileo.train.config import PretrainConfig, build_config
from phileo.train.dist import DistInfo
from phileo.train.engine import StepContext, Task, Trainer, TrainResult
from phileo.train.loss import FoundationLoss, make_views

log = logging.getLogger("phileo.train")

N_VIEWS = 2
# Sentinel-2 true colour from the PhilEO band order (B02 B03 B04 B08 ...): R = B04, G = B03, B = B02.
RGB = (2, 1, 0)
RGB_GAIN = 3.5  # reflectance 0.0-0.29 → 0-1: the usual brightening of L2A true colour
# Optional targets → the model heads that predict them (named as in the published state dicts).
AUX_HEADS = {"buildings": "encoder.head_buildings", "landcover": "encoder.head_landcover"}


def rgb(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) reflectance → (B, 3, H, W) displayable true colour in [0, 1]."""
    return (images[:, list(RGB)].float() * RGB_GAIN).clamp(0, 1)


def image_grid(rows: Sequence[torch.Tensor], pad: int = 2) -> torch.Tensor:
    """Stacks rows of (N, 3, H, W) images into one CHW grid with `pad` white pixels between tiles."""
    n, c, h, w = rows[0].shape
    grid = torch.ones(c, len(rows) * (h + pad) - pad, n * (w + pad) - pad)
    for r, row in enumerate(rows):
        for i in range(n):
            grid[:, r * (h + pad):r * (h + pad) + h, i * (w + pad):i * (w + pad) + w] = row[i].detach().cpu()
    return grid


class FoundationTask(Task):
    """PhilEO pretraining: model `model.name`, the node's shards through PretrainDataset, two corrupted views
    per sample through the same weights (one forward pass on the stacked views), the foundation loss."""

    split = "node"
    name = "pretrain"

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.loss = FoundationLoss(cfg.loss)
        # Auxiliary targets the data carries (set by train_dataset(), which the Trainer calls first).
        self.aux_targets: set[str] = set()
        # Chunk indices the start-up verification found bad, left out under data.on_bad_chunk=skip.
        self.bad_chunks: dict[int, str] = {}

    def build_model(self) -> nn.Module:
        """create_model(model.name, **model.overrides); the auxiliary heads whose targets the shards do not carry
        are frozen (no gradient would reach them: DDP would stop on the unused parameters, and AdamW's weight
        decay would shrink them for nothing). They stay in the state dict, untouched."""
        from phileo.models import create_model

        overrides = dict(self.cfg.model.overrides)
        if self.cfg.model.grad_checkpointing:
            overrides["grad_checkpointing"] = True
        model = create_model(self.cfg.model.name, **overrides)
        frozen = [head for target, head in AUX_HEADS.items() if target not in self.aux_targets]
        for name, p in model.named_parameters():
            if name.startswith(tuple(f"{h}." for h in frozen)):
                p.requires_grad_(False)
        return model

    def prepare_data(self, info: DistInfo) -> dict[str, float] | None:
        """Verifies every chunk of data.root against manifest.json (data.verify_chunks): global rank r checks
        every world_size-th chunk (size, then checksum; phileo.data.integrity) and the ranks exchange what they
        found, so all agree. data.on_bad_chunk=stop: every rank raises BadChunkError naming the bad chunks, their
        cells and the fix. skip: they are left out of train_dataset() (a warning each in log.txt); refused
        (BadChunkError) when that leaves a node no chunk. Returns {"data/bad_chunks": n} when it verified."""
        from phileo.data import load_manifest
        from phileo.data.integrity import bad_chunk_error, find_bad_chunks, rank_share
        from phileo.train import dist

        _require_data_root(self.cfg)
        data = self.cfg.data
        if not data.verify_chunks:
            log.info("data.verify_chunks=false: the chunk files of %s are not verified at start", data.root)
            return None
        manifest = load_manifest(data.root)
        t0 = time.perf_counter()
        found = find_bad_chunks(manifest, rank_share(manifest, info.global_rank, info.world_size))
        shares = dist.all_gather_object((found, time.perf_counter() - t0))
        bad = {index: problem for share, _ in shares for index, problem in share.items()}
        seconds, gb = max(s for _, s in shares), sum(c.bytes for c in manifest.chunks) / 1e9
        log.info("verified %d chunk files (%.2f GB) of %s against manifest.json in %.1f s on %d rank(s) "
                 "(%.2f GB/s): %s", len(manifest.chunks), gb, data.root, seconds, info.world_size,
                 gb / max(seconds, 1e-9), f"{len(bad)} bad" if bad else "all match")
        if bad and data.on_bad_chunk == "stop":
            raise bad_chunk_error(manifest, bad)
        if bad:
            self._skip(manifest, bad, info)
        self.bad_chunks = bad
        return {"data/bad_chunks": float(len(bad))}

    @staticmethod
    def _skip(manifest: Any, bad: dict[int, str], info: DistInfo) -> None:
        """data.on_bad_chunk=skip: refuses (BadChunkError, on every rank) when a node would be left without a
        chunk, else logs a warning per bad chunk and how to repair them."""
        from phileo.data import assign_chunks
        from phileo.data.chunk_format import BadChunkError
        from phileo.data.integrity import bad_chunk_error, cells_text, chunk_cells, repair_text

        # The nodes' shares stay those of the full list (PretrainDataset's exclude_chunks), so one node may lose
        # all of its chunks while the others lose none.
        empty = [n for n, node in enumerate(assign_chunks(manifest, info.num_nodes))
                 if all(c.index in bad for c in node)]
        if empty:
            e = bad_chunk_error(manifest, bad)
            raise BadChunkError(f"data.on_bad_chunk=skip cannot leave them out: node(s) "
                                f"{', '.join(map(str, empty))} of {info.num_nodes} would have no chunk left to "
                                f"read. Repair them, or train on fewer nodes.\n{e}", e.paths)
        if not info.is_main:
            return
        chunks = [c for c in manifest.chunks if c.index in bad]
        for c in chunks:
            cells, _ = chunk_cells(manifest, c)
            log.warning("data.on_bad_chunk=skip: leaving out bad chunk %s: %s; its %d cells (%s) are not trained "
                        "on", manifest.chunk_path(c), bad[c.index], c.n_cells, cells_text(cells))
        log.warning("%d bad chunk(s) left out of training. %s", len(chunks), repair_text(manifest, chunks))

    def train_dataset(self, info: DistInfo) -> Dataset:
        from phileo.data import PretrainDataset

        _require_data_root(self.cfg)
        dataset = PretrainDataset(Path(self.cfg.data.root), node_rank=info.node_rank, num_nodes=info.num_nodes,
                                  patch_size=self.cfg.data.patch_size, random_crop=True, seed=self.cfg.data.seed,
                                  exclude_chunks=self.bad_chunks)
        if dataset.excluded_chunks:
            log.info("node %d reads %d cells in %d chunks (%d bad chunk(s) of its share left out)", info.node_rank,
                     dataset.num_cells, len(dataset.chunks), len(dataset.excluded_chunks))
        self.aux_targets = {t for t in AUX_HEADS if t in getattr(dataset, "aux_targets", ())}
        return dataset

    def forward(self, model: nn.Module, batch: dict[str, Any], ctx: StepContext) -> Any:
        views, targets = make_views(batch["image"], ctx.generator(), n_views=N_VIEWS, flips=self.cfg.loss.flips,
                                    erase_fraction=tuple(self.cfg.loss.erase_fraction))
        batch["view_inputs"], batch["view_targets"] = views, targets
        return model(views)

    def compute_loss(self, outputs: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        targets = {"images": batch["view_targets"], "coords": batch["coords"],
                   "cloud_fraction": batch["cloud_fraction"]}
        for key in self.aux_targets:  # the auxiliary terms only for targets the shards carry
            targets[key], targets[f"{key}_weight"] = batch[key], batch[f"{key}_weight"]
        return self.loss(outputs, targets, n_views=N_VIEWS)

    def images(self, outputs: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        n = min(4, batch["image"].shape[0])
        b = batch["image"].shape[0]
        rows = [rgb(batch["view_targets"][:n]), rgb(batch["view_inputs"][:n]),
                rgb(outputs["reconstruction"][:n]),
                rgb(batch["view_inputs"][b:b + n]), rgb(outputs["reconstruction"][b:b + n])]
        return {"images/target_view1_recon1_view2_recon2": image_grid(rows)}

    def train_flops_per_sample(self, model: nn.Module) -> float | None:
        per_view = super().train_flops_per_sample(model)  # 3 × forward (forward + backward)
        return N_VIEWS * per_view if per_view is not None else None

    def hparams(self) -> dict[str, Any]:
        return {"model": self.cfg.model.name, "patch_size": self.cfg.data.patch_size}


def _require_data_root(cfg: PretrainConfig) -> None:
    if not cfg.data.root:
        raise ConfigError("data.root is not set: point it at the folder holding manifest.json written by "
                          "preprocess/majortom_to_h5.py (data.root=/path/to/shards, or --data with the launcher)")


def run_pretraining(cfg: PretrainConfig, info: DistInfo | None = None) -> TrainResult:
    """Runs (or resumes, or finds finished) the pretraining described by `cfg` in this process.

    The distributed layout comes from the environment unless `info` is given (phileo.train.dist.init_distributed);
    the run resumes from the newest checkpoint in cfg.run.dir; a run whose DONE marker covers train.steps
    returns at once. Returns TrainResult(status="completed" | "preempted" | "failed", step, final_loss, run_dir).
    """
    from phileo.config import validate

    validate(cfg)
    _require_data_root(cfg)  # before anything is created in run.dir
    return Trainer(cfg, FoundationTask(cfg), info).fit()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m phileo.train.pretrain",
        description="Pretrain a PhilEO model on HDF5 shards (DDP or DeepSpeed ZeRO; resumes from run.dir).",
        epilog="Overrides are key=value, e.g. model.name=phileo_vit_100m train.strategy=zero2 data.batch_size=16 "
               "train.steps=100000 optim.lr=3e-5 run.dir=$SCRATCH/runs/vit. Keys: see phileo/train/config.py.")
    add_config_args(parser, "model, data, loss, optim, train, checkpoint, run")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR with its config.yaml")
    args = parser.parse_args(argv)
    return run_config_job(
        lambda: build_config(PretrainConfig, args.config, args.overrides, resume_dir=args.resume,
                             recipe=args.recipe), run_pretraining,
        args.print_config,
        summary=lambda r: (f"{r.status} at step {r.step} (final loss {r.final_loss}) in {r.run_dir}"
                           + (f": {r.message}" if r.message else "")))


if __name__ == "__main__":
    sys.exit(main())
