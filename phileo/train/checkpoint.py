"""Checkpoint folders in a run: layout, atomic commit, pruning, and the newest one by step number.

    run_dir/checkpoints/step_00000100/
        model.pt         {"model": fp32 state dict of the bare model (no "module." prefix), "step": int,
                          "config": dict}: everything a user needs to evaluate or fine-tune, whatever the strategy
        trainer.pt       step, last loss, the task's state, strategy and world size (global rank 0)
        optimizer.pt     optimizer + LR scheduler state (ddp; replicated, written by rank 0)
        deepspeed/state/ DeepSpeed's own sharded checkpoint (zero1-3: every rank writes its partition)
        rank_00000.pt    per global rank: RNG states (torch, CUDA, numpy, python) and the data position

A checkpoint is written into `checkpoints/.step_00000100.tmp` by all ranks and renamed to `step_00000100` by
rank 0 once every rank has finished, so a folder named `step_*` is always complete; a crash mid-save leaves only
a dot-folder that the next start deletes. The newest checkpoint is chosen by step number, never by name order
(the reference resumed from epoch_9 after epoch_10).
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from phileo.fsutil import atomic_path, atomic_write_json, make_group_readable, read_json
from phileo.train import dist

CHECKPOINTS = "checkpoints"
DONE = "DONE"
MODEL_FILE = "model.pt"
TRAINER_FILE = "trainer.pt"
log = logging.getLogger("phileo.train")
_STEP_RE = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """run_dir/checkpoints/step_<step, 8 digits>."""
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step of a checkpoint folder (from its name); refuses a folder not named step_<digits>."""
    m = _STEP_RE.match(Path(path).name)
    if not m:
        raise ValueError(f"{path} is not a checkpoint folder (expected a name like step_00000100)")
    return int(m.group(1))


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of the run as (step, folder), oldest first, ordered by step number."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        # model.pt is written last-but-one before the rename; its presence guards against a folder someone
        # copied half-way by hand.
        if m and p.is_dir() and (p / "model.pt").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder of `run_dir` by step number, or None when there is none."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def tmp_checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of `step` is assembled before it is renamed into place."""
    return Path(run_dir) / CHECKPOINTS / f".step_{step:08d}.tmp"


def remove_stale_tmp(run_dir: str | os.PathLike) -> list[Path]:
    """Deletes half-written checkpoint folders left by a crash mid-save; returns what it removed.
    Call on one rank, before any rank starts saving."""
    root = Path(run_dir) / CHECKPOINTS
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".step_") and p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def prepare_tmp_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """Creates an empty temporary folder for the checkpoint of `step` (rank 0; others wait at a barrier)."""
    tmp = tmp_checkpoint_dir(run_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    make_group_readable(tmp.parent, directory=True)
    return tmp


def fsync_tree(path: str | os.PathLike) -> None:
    """Flushes every file under `path` to storage (so a renamed checkpoint survives a node crash)."""
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            except OSError:
                pass
            finally:
                os.close(fd)


def make_tree_group_readable(path: str | os.PathLike) -> None:
    """Group read on every file and group traverse on every folder under `path` (shared scratch)."""
    make_group_readable(path, directory=True)
    for dirpath, dirs, files in os.walk(path):
        for d in dirs:
            make_group_readable(os.path.join(dirpath, d), directory=True)
        for f in files:
            make_group_readable(os.path.join(dirpath, f))


def commit_tmp_dir(tmp: Path, final: Path) -> Path:
    """Renames the finished temporary folder into place (rank 0, after every rank has written its part).

    If `final` already exists (the same step saved twice, e.g. a stop signal right after a resume) the old
    folder is moved aside first and deleted after the rename, so a complete checkpoint of that step exists at
    every moment.
    """
    make_tree_group_readable(tmp)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Deletes all but the `keep_last` newest complete checkpoints (by step); returns the deleted folders."""
    found = list_checkpoints(run_dir)
    doomed = [p for _, p in found[:-keep_last]] if keep_last > 0 else []
    for p in doomed:
        delete_checkpoint(p)
    return doomed


def delete_checkpoint(path: Path) -> None:
    """Deletes one checkpoint folder, renamed first so a reader never sees a half-deleted folder under a
    complete-looking name."""
    trash = path.with_name(f".{path.name}.deleting")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_file(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save through a temporary name (used for model.pt and friends)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def load_file(path: str | os.PathLike, what: str) -> Any:
    """torch.load on CPU with an error naming the file when it is missing or unreadable."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}; the checkpoint folder {p.parent} is incomplete or from "
                                f"another version: delete it to resume from the previous one")
    try:
        return torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise RuntimeError(f"cannot read {what} {p}: {e}; delete the checkpoint folder {p.parent} to resume from "
                           f"the previous one") from e


def rank_state_path(ckpt: str | os.PathLike, global_rank: int) -> Path:
    return Path(ckpt) / f"rank_{global_rank:05d}.pt"


def capture_rng_state() -> dict[str, Any]:
    """The RNG states of this process: torch CPU, CUDA (all visible devices), numpy's global, python's."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Puts back what capture_rng_state() returned (CUDA only when both sides have it)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_model_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The fp32 bare-model state dict from a checkpoint folder or its model.pt (for evaluation, fine-tuning)."""
    p = Path(path)
    if p.is_dir():
        p = p / "model.pt"
    ckpt = load_file(p, "model checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{p} is not a PhilEO model checkpoint (expected a dict with a 'model' state dict)")
    return ckpt["model"]


def write_done(run_dir: str | os.PathLike, step: int, final_loss: float | None, **extra: Any) -> Path:
    """Writes the DONE marker (JSON: final step, final loss, extra fields) atomically."""
    return atomic_write_json(Path(run_dir) / DONE, {"step": step, "final_loss": final_loss, **extra})


def read_done(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The DONE marker's content, or None when the run has not finished."""
    p = Path(run_dir) / DONE
    return read_json(p, "DONE marker") if p.is_file() else None


@dataclass
class Resumed:
    """What CheckpointManager.load() read back besides the strategy's own state: `trainer` is trainer.pt (step,
    last loss, the task's state, strategy, world size); `rank` is this rank's rank_*.pt (RNG states, data
    position), or None when the checkpoint was written by another number of processes."""

    path: Path
    step: int
    trainer: dict[str, Any]
    rank: dict[str, Any] | None


class CheckpointManager:
    """Every checkpoint rule of a run in one place: save (atomic, collective), list, verify, load, retention.

    run_dir/checkpoints/ holds complete `step_*` folders only (see the module docstring for the layout and the
    commit protocol). `strategy` (phileo.train.strategy) writes and reads the model and optimizer part; this class
    writes the rest (trainer.pt on global rank 0, rank_*.pt on every rank) and owns the folder's life cycle.
    All methods that take part in a save or load are collective: call them on every rank.

    Per-file manifests and "skip a bad newest checkpoint" (issue 14) belong in verify() and latest(): listing
    and resuming already go through them and nothing else decides what a complete checkpoint is.
    """

    def __init__(self, run_dir: str | os.PathLike, keep_last: int, info: dist.DistInfo):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (the newest checkpoint is needed to resume), got {keep_last}")
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last
        self.info = info

    # -- what is there
    def list(self) -> list[tuple[int, Path]]:
        """Complete checkpoints as (step, folder), oldest first, by step number."""
        return list_checkpoints(self.run_dir)

    def latest(self) -> Path | None:
        """The newest complete checkpoint (decided on global rank 0, the same answer on every rank)."""
        return dist.broadcast_object(latest_checkpoint(self.run_dir) if self.info.is_main else None)

    def verify(self, ckpt: str | os.PathLike) -> list[str]:
        """What is wrong with the checkpoint folder `ckpt` (empty when it is usable): missing or empty files of
        the parts this class and the strategy write. Does not read the tensors."""
        p = Path(ckpt)
        problems = []
        if not _STEP_RE.match(p.name):
            problems.append(f"{p.name} is not named step_<digits>")
        for name in (MODEL_FILE, TRAINER_FILE):
            f = p / name
            if not f.is_file():
                problems.append(f"{name} is missing")
            elif f.stat().st_size == 0:
                problems.append(f"{name} is empty")
        return problems

    def clean_stale(self) -> list[Path]:
        """Deletes half-written folders of an earlier crash (global rank 0, before any save); returns them."""
        return remove_stale_tmp(self.run_dir) if self.info.is_main else []

    # -- save and load
    def save(self, step: int, strategy: Any, payload: dict[str, Any], trainer_state: dict[str, Any],
             rank_state: dict[str, Any]) -> Path:
        """Writes the checkpoint of `step` and returns its folder (collective). The folder is assembled under a
        temporary name by all ranks, flushed, renamed into place by rank 0 once every rank has finished, then
        older checkpoints beyond keep_last are deleted. payload goes into model.pt beside the weights."""
        final = checkpoint_dir(self.run_dir, step)
        tmp = tmp_checkpoint_dir(self.run_dir, step)
        if self.info.is_main:
            prepare_tmp_dir(self.run_dir, step)
        dist.barrier()
        strategy.save(tmp, payload)
        save_file(rank_state, rank_state_path(tmp, self.info.global_rank))
        if self.info.is_main:
            save_file(trainer_state, tmp / TRAINER_FILE)
        fsync_tree(tmp)
        dist.barrier()
        if self.info.is_main:
            commit_tmp_dir(tmp, final)
            self.prune()
        dist.barrier()
        return final

    def prune(self) -> list[Path]:
        """Retention: deletes all but the keep_last newest complete checkpoints (global rank 0)."""
        if not self.info.is_main:
            return []
        doomed = prune_checkpoints(self.run_dir, self.keep_last)
        for old in doomed:
            log.info("deleted old checkpoint %s (checkpoint.keep_last=%d)", old.name, self.keep_last)
        return doomed

    def load(self, ckpt: str | os.PathLike, strategy: Any, expect_strategy: str) -> Resumed:
        """Loads the model and optimizer into `strategy` and returns the rest (collective). Refuses a checkpoint
        of another train.strategy, naming both."""
        p = Path(ckpt)
        trainer_state = load_file(p / TRAINER_FILE, "trainer state")
        if trainer_state.get("strategy") != expect_strategy:
            raise RuntimeError(
                f"{p} was written with train.strategy={trainer_state.get('strategy')} but this run uses "
                f"train.strategy={expect_strategy}; resume with the same strategy, or start a new run.dir")
        strategy.load(p)
        rank_file = rank_state_path(p, self.info.global_rank)
        rank = None
        if rank_file.is_file() and trainer_state.get("world_size") == self.info.world_size:
            rank = load_file(rank_file, "rank state")
        return Resumed(p, int(trainer_state["step"]), trainer_state, rank)

    def load_task_state(self, ckpt: str | os.PathLike | None = None) -> dict[str, Any]:
        """The task's state saved in `ckpt` (default: the newest checkpoint) without touching any model."""
        p = Path(ckpt) if ckpt is not None else latest_checkpoint(self.run_dir)
        if p is None:
            raise FileNotFoundError(f"{self.run_dir / CHECKPOINTS} holds no complete checkpoint")
        return load_file(p / TRAINER_FILE, "trainer state").get("task", {})

    # -- the end of a run
    def done(self) -> dict[str, Any] | None:
        """The DONE marker's content, or None when the run has not finished."""
        return read_done(self.run_dir)

    def mark_done(self, step: int, final_loss: float | None, **extra: Any) -> None:
        """Writes DONE (global rank 0)."""
        if self.info.is_main:
            write_done(self.run_dir, step, final_loss, **extra)

    def remove_all(self) -> int:
        """Deletes every checkpoint of the run (global rank 0), e.g. a finished fine-tune's resume state once
        its outputs are written; returns the bytes freed. Each folder is renamed first, as in retention."""
        if not self.info.is_main:
            return 0
        freed = 0
        for _, p in self.list():
            freed += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            delete_checkpoint(p)
        return freed

    def clear_done(self) -> None:
        """Removes DONE (global rank 0): train.steps was raised past a finished run."""
        if self.info.is_main:
            (self.run_dir / DONE).unlink(missing_ok=True)


__all__ = ["CheckpointManager", "Resumed", "MODEL_FILE", "TRAINER_FILE", "CHECKPOINTS", "DONE", "checkpoint_dir", "checkpoint_step", "list_checkpoints", "latest_checkpoint",
           "tmp_checkpoint_dir", "remove_stale_tmp", "prepare_tmp_dir", "commit_tmp_dir", "prune_checkpoints", "delete_checkpoint",
           "fsync_tree", "make_tree_group_readable", "save_file", "load_file", "rank_state_path",
           "capture_rng_state", "restore_rng_state", "load_model_state", "write_done", "read_done"]
