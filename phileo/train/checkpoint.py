"""Checkpoint folders in a run: layout, atomic commit, pruning, and the newest one by step number.

    run_dir/checkpoints/step_00000100/
        model.pt         {"model": fp32 state dict of the bare model (no "module." prefix), "step": int,
                          "config": dict}: everything a user needs to evaluate or fine-tune, whatever the strategy
        trainer.pt       step, last loss, the task's state, strategy, world size, the run's data layout and
                         the accumulation of the launch that wrote it (global rank 0)
        optimizer.pt     optimizer + LR scheduler state (ddp; replicated, written by rank 0)
        deepspeed/state/ DeepSpeed's own sharded checkpoint (zero1-3: every rank writes its partition)
        rank_00000.pt    per global rank: RNG states (torch, CUDA, numpy, python), restored on the same process
                         count, and the data position (informative: it follows from the step and the layout)
        manifest.json    written last: {"format", "version", "step", "files": {relative path: {"size", "crc32"}}}

A checkpoint is written into `checkpoints/.step_00000100.tmp` by all ranks; once every rank has finished, rank 0
reads every file back into manifest.json (size and crc32 of each) and renames the folder to `step_00000100`. A
checkpoint counts only when its manifest is there (`list_checkpoints`); a crash mid-save leaves only a dot-folder
that the next start deletes. `verify_checkpoint` re-reads the files against the manifest: on resume a corrupt or
truncated newest checkpoint is moved aside to `step_00000100.corrupt` with a warning and the previous good one is
used, and retention never deletes a checkpoint until keep_last newer ones have verified. The newest checkpoint
is chosen by step number, never by name order (the reference resumed from epoch_9 after epoch_10).
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

from phileo.fsutil import (DiskFullError, atomic_path, atomic_write_json, file_digest, is_disk_full,
                           make_group_readable, read_json)
from phileo.train import dist
from phileo.train.watchdog import heartbeat

CHECKPOINTS = "checkpoints"
DONE = "DONE"
MODEL_FILE = "model.pt"
TRAINER_FILE = "trainer.pt"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "phileo-checkpoint"
MANIFEST_VERSION = 1
CORRUPT_SUFFIX = ".corrupt"
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
        # The manifest is written last, after every rank's files: without it the folder is not a checkpoint,
        # unless it is one written before manifests existed (renamed into place complete, as saves always were).
        if m and p.is_dir() and ((p / MANIFEST_FILE).is_file() or is_legacy_checkpoint(p)):
            found.append((int(m.group(1)), p))
    return sorted(found)


def is_legacy_checkpoint(folder: Path) -> bool:
    """A checkpoint of a version before manifests: no manifest.json, but model.pt and trainer.pt (such folders
    were assembled under a temporary name and renamed when complete). Resumed from, so a campaign running across
    the upgrade keeps its progress; verified by presence only, since nothing recorded its sizes or checksums."""
    return not (folder / MANIFEST_FILE).exists() and (folder / MODEL_FILE).is_file() \
        and (folder / TRAINER_FILE).is_file()


def unlisted_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """step_* folders without a manifest (incomplete, or from a version before manifests): never resumed from."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if _STEP_RE.match(p.name) and p.is_dir() and not (p / MANIFEST_FILE).is_file()
                  and not is_legacy_checkpoint(p))


def write_manifest(folder: str | os.PathLike, step: int) -> Path:
    """Reads back every file under `folder` and writes manifest.json (size, crc32 of each) last, atomically."""
    folder = Path(folder)
    files = {}
    for dirpath, _, names in os.walk(folder):
        for name in sorted(names):
            f = Path(dirpath) / name
            rel = f.relative_to(folder).as_posix()
            if rel == MANIFEST_FILE or name.endswith(".tmp"):
                continue
            files[rel] = {"size": f.stat().st_size, "crc32": file_digest(f, "crc32")}
    return atomic_write_json(folder / MANIFEST_FILE, {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
                                                      "step": step, "files": dict(sorted(files.items()))})


def verify_checkpoint(folder: str | os.PathLike, checksums: bool = True) -> list[str]:
    """What is wrong with the checkpoint `folder` against its manifest (empty when it is intact): the manifest
    missing or unreadable, model.pt/trainer.pt not listed, a listed file missing, of another size, or (with
    `checksums`) of another crc32. Reads every file once (crc32, ~3 GB/s)."""
    p = Path(folder)
    problems = []
    if not _STEP_RE.match(p.name):
        problems.append(f"{p.name} is not named step_<digits>")
    try:
        manifest = read_json(p / MANIFEST_FILE, "checkpoint manifest")
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}")
    except FileNotFoundError:
        if is_legacy_checkpoint(p):
            return problems  # written before manifests: model.pt and trainer.pt are there, nothing else to check
        return problems + [f"{MANIFEST_FILE} is missing (the save did not finish)"]
    except (ValueError, KeyError, TypeError) as e:
        return problems + [f"{MANIFEST_FILE} is unreadable ({e})"]
    for name in (MODEL_FILE, TRAINER_FILE):
        if name not in files:
            problems.append(f"{name} is not in the manifest")
    for rel, want in files.items():
        f = p / rel
        if not f.is_file():
            problems.append(f"{rel} is missing")
        elif f.stat().st_size != want["size"]:
            problems.append(f"{rel} has {f.stat().st_size} bytes, the manifest says {want['size']} (truncated?)")
        elif checksums and file_digest(f, "crc32") != want["crc32"]:
            problems.append(f"{rel} does not match its checksum (corrupt)")
    return problems


def set_aside(folder: Path) -> Path:
    """Renames a bad checkpoint to step_X.corrupt (no longer listed, kept for a look); returns the new name."""
    aside = folder.with_name(folder.name + CORRUPT_SUFFIX)
    if aside.exists():
        shutil.rmtree(aside, ignore_errors=True)
    os.replace(folder, aside)
    return aside


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder of `run_dir` by step number, or None when there is none."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def tmp_checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of `step` is assembled before it is renamed into place."""
    return Path(run_dir) / CHECKPOINTS / f".step_{step:08d}.tmp"


def scratch_dir(ckpt: str | os.PathLike, purpose: str) -> Path:
    """A temporary folder beside the checkpoint folder `ckpt` (`checkpoints/.step_X.<purpose>.tmp`), outside its
    manifest-verified contents, e.g. DeepSpeed's universal form of a ZeRO checkpoint while it is loaded; the
    next start deletes one a crash left behind (remove_stale_tmp)."""
    p = Path(ckpt)
    return p.parent / f".{p.name}.{purpose}.tmp"


def remove_stale_tmp(run_dir: str | os.PathLike) -> list[Path]:
    """Deletes half-written checkpoint folders (and scratch_dir folders) left by a crash mid-save; returns what
    it removed. Call on one rank, before any rank starts saving."""
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


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int,
                      is_good: Any = lambda p: not verify_checkpoint(p)) -> list[Path]:
    """Retention: keeps the `keep_last` newest checkpoints that pass `is_good` (default: verify_checkpoint) and
    everything newer than the oldest of them; deletes what is older. Nothing is deleted until keep_last good ones
    exist, so the last verified checkpoint outlives a successor that fails verification. Returns the deleted."""
    found = list_checkpoints(run_dir)
    good, doomed = 0, []
    for _, p in reversed(found):
        if good >= keep_last > 0:
            doomed.append(p)
        elif is_good(p):
            good += 1
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
    """torch.save through a temporary name (used for model.pt and friends). Through a Python file object, so a
    full disk surfaces as OSError ENOSPC (torch's own file writer reports only "iostream error")."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)
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


def saved_data_layout(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's data layout (trainer.pt "data_layout", phileo.train.loader.DataLayout.to_dict) from its newest
    checkpoint with a readable trainer.pt, or None (no checkpoint, or one written before layouts). Not
    collective: for a job that sizes its schedule by the run's global batch before the Trainer starts
    (fine-tuning counts epochs); the layout is fixed for the life of a run, so any checkpoint tells it."""
    for _, p in reversed(list_checkpoints(run_dir)):
        try:
            return load_file(p / TRAINER_FILE, "trainer state").get("data_layout")
        except (FileNotFoundError, RuntimeError):
            continue
    return None


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
    last loss, the task's state, strategy, world size, data layout); `rank` is this rank's rank_*.pt (RNG states,
    data position), or None when the checkpoint was written by another number of processes."""

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

    What a complete checkpoint is has one answer, here: listed (manifest written last), and verify() finds every
    file of the manifest with its size and checksum. latest() skips (sets aside) a newest one that fails, and
    prune() keeps keep_last verified ones. A full disk during save() is a DiskFullError naming the path and the
    free space; the half-written folder is deleted and the previous checkpoint stays as it was.
    """

    def __init__(self, run_dir: str | os.PathLike, keep_last: int, info: dist.DistInfo):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (the newest checkpoint is needed to resume), got {keep_last}")
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last
        self.info = info
        self._verified: set[tuple[str, int]] = set()  # (folder, manifest mtime) checked by this process

    # -- what is there
    def list(self) -> list[tuple[int, Path]]:
        """Complete checkpoints as (step, folder), oldest first, by step number."""
        return list_checkpoints(self.run_dir)

    def latest(self) -> Path | None:
        """The newest checkpoint that verifies (decided on global rank 0, the same answer on every rank). A newer
        one that fails verification is set aside (step_X.corrupt) with a warning naming what is wrong, so a
        requeued job goes on from the previous good one instead of stopping the campaign."""
        return dist.broadcast_object(self._newest_good() if self.info.is_main else None)

    def _newest_good(self) -> Path | None:
        for old in unlisted_checkpoints(self.run_dir):
            log.warning("ignoring %s: it has no %s and no %s + %s (an unfinished copy); delete it if it is not "
                        "needed", old, MANIFEST_FILE, MODEL_FILE, TRAINER_FILE)
        for _, p in reversed(self.list()):
            problems = self.verify(p)
            if not problems:
                if is_legacy_checkpoint(p):
                    log.warning("resuming from %s, written before checkpoint manifests: its files are checked by "
                                "presence only (the next save writes a manifest)", p.name)
                return p
            aside = set_aside(p)
            log.warning("checkpoint %s is unusable (%s): moved aside to %s, resuming from the previous one",
                        p.name, "; ".join(problems), aside.name)
        return None

    def verify(self, ckpt: str | os.PathLike) -> list[str]:
        """What is wrong with the checkpoint folder `ckpt` against its manifest (empty when it is usable); see
        verify_checkpoint. A folder verified once by this manager (its own save) is not read again."""
        p = Path(ckpt)
        key = self._verified_key(p)
        if key is not None and key in self._verified:
            return []
        problems = verify_checkpoint(p)
        if not problems and key is not None:
            self._verified.add(key)
        return problems

    @staticmethod
    def _verified_key(p: Path) -> tuple[str, int] | None:
        try:
            return str(p), (p / MANIFEST_FILE).stat().st_mtime_ns
        except OSError:
            return None

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
        try:
            strategy.save(tmp, payload)
            heartbeat()  # a long save on a slow file system is progress, not a hang (phileo.train.watchdog)
            save_file(rank_state, rank_state_path(tmp, self.info.global_rank))
            if self.info.is_main:
                save_file(trainer_state, tmp / TRAINER_FILE)
            fsync_tree(tmp)
            heartbeat()
        except Exception as e:
            if not is_disk_full(e):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            raise self._disk_full(tmp) from e
        dist.barrier()
        if self.info.is_main:
            try:
                write_manifest(tmp, step)
                heartbeat()
            except DiskFullError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                raise self._disk_full(tmp) from e
            commit_tmp_dir(tmp, final)
            # The manifest was computed by reading the files back: this checkpoint is verified.
            key = self._verified_key(final)
            if key is not None:
                self._verified.add(key)
            self.prune()
        dist.barrier()
        return final

    def _disk_full(self, tmp: Path) -> DiskFullError:
        found = self.list()
        err = DiskFullError(tmp, "checkpoint")
        err.strerror = (f"{err.strerror}; the unfinished checkpoint was deleted and the previous one "
                        f"({found[-1][1] if found else 'none'}) is untouched")
        return err

    def prune(self) -> list[Path]:
        """Retention: deletes all but the keep_last newest complete checkpoints (global rank 0)."""
        if not self.info.is_main:
            return []
        doomed = prune_checkpoints(self.run_dir, self.keep_last, is_good=lambda p: not self.verify(p))
        for old in doomed:
            log.info("deleted old checkpoint %s (checkpoint.keep_last=%d)", old.name, self.keep_last)
        return doomed

    def peek(self, ckpt: str | os.PathLike) -> dict[str, Any]:
        """The fields of `ckpt`'s trainer.pt that decide how a launch resumes, read on global rank 0 and the same
        on every rank (collective): step, strategy, world_size, data_layout (None in checkpoints written before
        layouts) and grad_accum_steps (the accumulation of the launch that wrote it; None likewise). A file
        that cannot be read raises on every rank."""
        fields, problem = None, None
        if self.info.is_main:
            try:
                state = load_file(Path(ckpt) / TRAINER_FILE, "trainer state")
                fields = {k: state.get(k) for k in ("step", "strategy", "world_size", "data_layout",
                                                     "grad_accum_steps")}
            except Exception as e:  # every rank must learn of it, or the others wait in the broadcast
                problem = f"{type(e).__name__}: {e}"
        fields, problem = dist.broadcast_object((fields, problem))
        if problem:
            raise RuntimeError(problem)
        return fields

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


__all__ = ["CheckpointManager", "Resumed", "MODEL_FILE", "TRAINER_FILE", "MANIFEST_FILE", "CHECKPOINTS", "DONE",
           "write_manifest", "verify_checkpoint", "is_legacy_checkpoint", "unlisted_checkpoints", "set_aside", "checkpoint_dir",
           "checkpoint_step", "list_checkpoints", "latest_checkpoint",
           "tmp_checkpoint_dir", "scratch_dir", "remove_stale_tmp", "prepare_tmp_dir", "commit_tmp_dir",
           "prune_checkpoints",
           "delete_checkpoint",
           "fsync_tree", "make_tree_group_readable", "save_file", "load_file", "rank_state_path",
           "capture_rng_state", "restore_rng_state", "load_model_state", "saved_data_layout", "write_done",
           "read_done"]
