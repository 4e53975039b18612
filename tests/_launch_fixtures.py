"""Helpers for the launcher tests: a PATH without the SLURM client, a converted set as preflight sees it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from phileo.launch.slurm import CLIENT_TOOLS


def hidden_slurm_path(tmp: Path, path: str | None = None) -> str:
    """PATH without the SLURM client: every folder holding one of CLIENT_TOOLS is replaced by a copy made of
    links to all its other programs, so python, sh and the rest are still found and sbatch & co. are not."""
    folders = []
    for k, folder in enumerate((path if path is not None else os.environ.get("PATH", "")).split(os.pathsep)):
        d = Path(folder)
        if not folder or not d.is_dir() or not any((d / t).exists() for t in CLIENT_TOOLS):
            folders.append(folder)
            continue
        mirror = tmp / f"path{k}"
        mirror.mkdir(parents=True, exist_ok=True)
        for entry in d.iterdir():
            if entry.name not in CLIENT_TOOLS and not (mirror / entry.name).exists():
                (mirror / entry.name).symlink_to(entry)
        folders.append(str(mirror))
    return os.pathsep.join(folders)


def write_manifest(root: Path, n_chunks: int, chunk_bytes: int = 256) -> Path:
    """A converted set as preflight sees it: manifest.json (accepted by phileo.data.load_manifest) and chunk
    files of the recorded sizes. Preflight only stats chunks, so they hold zeros rather than HDF5."""
    from phileo.data.manifest import FORMAT, MANIFEST_NAME, SCHEMA_VERSION

    (root / "chunks").mkdir(parents=True, exist_ok=True)
    chunks = []
    for i in range(n_chunks):
        path = f"chunks/chunk_{i:05d}.h5"
        (root / path).write_bytes(b"\0" * chunk_bytes)
        chunks.append({"index": i, "path": path, "n_cells": 10, "checksum": "crc32:00000000", "bytes": chunk_bytes})
    doc = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "bands": ["B02"], "bands_10m": ["B02"],
           "bands_20m": [], "patch_size": 128, "max_patch_nodata": 0.0, "chunks": chunks, "stats": {},
           "rejected": [], "counts": {}}
    (root / MANIFEST_NAME).write_text(json.dumps(doc))
    return root


def write_bench(root: Path) -> Path:
    """A tiny PhilEO Bench folder (two regions, every task's labels)."""
    from phileo.bench.synthetic import make_bench_data

    make_bench_data(root, regions=["japan", "europe"], patches_per_file=2, val_patches_per_file=1, patch_size=8)
    return root
