"""Chunk readers open HDF5 read-only without file locks: on Lustre/GPFS mounts without flock a lock fails.

A lock that cannot be taken is made real here by another process holding the file open for writing (HDF5's
exclusive lock): a plain `h5py.File(path, "r")` is refused, the readers are not.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from _preprocess_fixtures import converted
from phileo.data.manifest import load_manifest
from phileo.fsutil import open_h5_read

HOLD = """
import sys, h5py
f = h5py.File(sys.argv[1], sys.argv[2])
f.flush()
print("holding", flush=True)
sys.stdin.read()
"""


def _hold_lock(path: Path, mode: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "HDF5_USE_FILE_LOCKING"}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "holding"
    return proc


@pytest.fixture
def no_env_lock_switch(monkeypatch):
    monkeypatch.delenv("HDF5_USE_FILE_LOCKING", raising=False)


def test_read_only_open_needs_no_lock(tmp_path, no_env_lock_switch):
    path = tmp_path / "a.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(5)
    holder = _hold_lock(path, "r+")
    try:
        with pytest.raises(OSError, match="lock"):
            h5py.File(path, "r")
        with open_h5_read(path) as f:
            assert f["x"][...].tolist() == [0, 1, 2, 3, 4]
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_pretrain_dataset_reads_chunks_another_process_has_locked(tmp_path_factory, no_env_lock_switch):
    from phileo.data.pretrain import PretrainDataset

    root = converted(tmp_path_factory, "parquet")
    chunk = load_manifest(root).chunk_path(load_manifest(root).assign(1)[0][0])
    holder = _hold_lock(chunk, "r+")
    try:
        ds = PretrainDataset(root, node_rank=0, num_nodes=1, patch_size=64, random_crop=False)
        item = ds[0]
        assert len(ds) > 0 and item is not None
        ds.close()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
