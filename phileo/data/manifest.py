"""The manifest of a converted MajorTOM set (`OUT/manifest.json`) and the chunk → node assignment.

The converter writes HDF5 chunk files under `OUT/chunks/` and one manifest describing them: schema version,
bands and their order, normalisation, per-band statistics, counts, the chunks (path, cells, checksum), which
node reads which chunk, and every cell that was rejected (with the reason), skipped by a threshold, or dropped
as a duplicate. The node assignment is a pure function of the chunks' cell counts and the number of nodes
(`assign_chunks`), so training on a different number of nodes never needs re-preprocessing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TypeVar

import numpy as np

from phileo.data.chunk_format import (FORMAT, MANIFEST_NAME, READABLE_SCHEMA_VERSIONS, REFLECTANCE_SCALE,
                                     SCHEMA_VERSION, checksum_matches)
from phileo.fsutil import read_json


@dataclass(frozen=True)
class ChunkInfo:
    """One chunk file: `path` relative to the manifest's folder, its cells, and a checksum of the whole file
    ('crc32:<8 hex>'; 'sha256:<64 hex>' in manifests from before the converter switched to crc32)."""

    index: int
    path: str
    n_cells: int
    checksum: str
    bytes: int
    n_grid_patches: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "path": self.path, "n_cells": self.n_cells, "checksum": self.checksum,
                "bytes": self.bytes, "n_grid_patches": self.n_grid_patches}


@dataclass
class Manifest:
    """A loaded `manifest.json`. `chunks` are the non-empty chunk files in index order; `stats` holds per-band
    mean/std/p01/p99 in reflectance (DN / 10000) in `bands` order; `raw` is the whole JSON document."""

    root: Path
    schema_version: int
    bands: list[str]
    bands_10m: list[str]
    bands_20m: list[str]
    bands_60m: list[str]
    patch_size: int
    max_patch_nodata: float
    chunks: list[ChunkInfo]
    stats: dict[str, Any]
    rejected: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    duplicates: list[dict[str, Any]]
    counts: dict[str, int]
    assignment: dict[str, Any]
    raw: dict[str, Any] = field(repr=False)

    @property
    def num_cells(self) -> int:
        """Cells stored in the chunk files (what pretraining sees)."""
        return sum(c.n_cells for c in self.chunks)

    def chunk_path(self, chunk: ChunkInfo) -> Path:
        return self.root / chunk.path

    def assign(self, num_nodes: int) -> list[list[ChunkInfo]]:
        """`assign_chunks(self, num_nodes)`."""
        return assign_chunks(self, num_nodes)


def _manifest_error(path: Path, problem: str) -> ValueError:
    return ValueError(f"{path} {problem}. Re-run the converter (python preprocess/majortom_to_h5.py --source … "
                      f"--out {path.parent} …; with --merge if the array tasks finished) to write it")


def load_manifest(root: str | os.PathLike) -> Manifest:
    """Reads and checks `root/manifest.json` (root may also be the manifest file itself).

    Raises FileNotFoundError when it is missing and ValueError when it is not valid JSON, was written by
    another schema version, or lacks fields; each message names the file and says how to produce it.
    """
    root = Path(root)
    path = root if root.name.endswith(".json") and root.is_file() else root / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {path.parent} is not a converted MajorTOM set (or the conversion has not "
            f"finished). Convert with: python preprocess/majortom_to_h5.py --source <MajorTOM folder> "
            f"--out {path.parent} --nodes <N>; after a SLURM array, run the same command with --merge")
    doc = read_json(path, what="manifest")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _manifest_error(path, f"is not a {FORMAT} manifest")
    version = doc.get("schema_version")
    if version not in READABLE_SCHEMA_VERSIONS:
        raise ValueError(f"{path} has schema_version {version}, this code reads versions "
                         f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))} (writes {SCHEMA_VERSION}): "
                         f"re-convert the data with this version of preprocess/majortom_to_h5.py (into a new "
                         f"--out folder), or use the code version that wrote it")
    try:
        chunks = [ChunkInfo(int(c["index"]), str(c["path"]), int(c["n_cells"]), str(c["checksum"]),
                            int(c["bytes"]), int(c.get("n_grid_patches", 0))) for c in doc["chunks"]]
        return Manifest(
            root=path.parent, schema_version=version, bands=list(doc["bands"]),
            bands_10m=list(doc["bands_10m"]), bands_20m=list(doc["bands_20m"]),
            bands_60m=list(doc.get("bands_60m", [])), patch_size=int(doc["patch_size"]),
            max_patch_nodata=float(doc["max_patch_nodata"]), chunks=chunks, stats=dict(doc["stats"]),
            rejected=list(doc["rejected"]), skipped=list(doc.get("skipped", [])),
            duplicates=list(doc.get("duplicates", [])), counts=dict(doc["counts"]),
            assignment=dict(doc.get("assignment", {})), raw=doc)
    except (KeyError, TypeError, ValueError) as e:
        raise _manifest_error(path, f"is incomplete or malformed ({type(e).__name__}: {e})") from None


T = TypeVar("T")


def _n_cells(chunk: Any) -> int:
    return int(chunk["n_cells"] if isinstance(chunk, dict) else chunk.n_cells)


def assign_chunks(manifest_or_chunks: Manifest | Sequence[T], num_nodes: int) -> list[list[T]]:
    """Splits chunks among `num_nodes` nodes, balanced by cell count; returns one list of chunks per node.

    Deterministic (largest chunks first, each to the node with the fewest cells so far, ties to the lower
    node index; each node's chunks then in chunk order), so every rank computes the same split. Takes a
    Manifest or a sequence of chunks (ChunkInfo or dicts with 'n_cells'). Refuses num_nodes < 1 or more nodes
    than chunks (a node would get nothing): convert with more, smaller chunks (--cells-per-chunk) instead.
    """
    chunks = list(manifest_or_chunks.chunks if isinstance(manifest_or_chunks, Manifest) else manifest_or_chunks)
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
    if num_nodes > len(chunks):
        where = (f" in {manifest_or_chunks.root / MANIFEST_NAME}" if isinstance(manifest_or_chunks, Manifest)
                 else "")
        raise ValueError(f"cannot split {len(chunks)} chunk(s){where} among {num_nodes} nodes: every node needs "
                         f"at least one chunk. Use at most {len(chunks)} nodes, or re-convert with a smaller "
                         f"--cells-per-chunk so that there are more chunks")
    order = sorted(range(len(chunks)), key=lambda i: (-_n_cells(chunks[i]), i))
    load = np.zeros(num_nodes, dtype=np.int64)
    nodes: list[list[int]] = [[] for _ in range(num_nodes)]
    for i in order:
        # Fewest cells first; among equals, the node with fewer chunks, then the lower index.
        node = min(range(num_nodes), key=lambda n: (load[n], len(nodes[n]), n))
        nodes[node].append(i)
        load[node] += _n_cells(chunks[i])
    return [[chunks[i] for i in sorted(idx)] for idx in nodes]


def chunk_problem(manifest: Manifest, chunk: ChunkInfo) -> str | None:
    """What is wrong with one chunk file against its manifest entry, or None when it matches: missing, another
    size (checked first: one stat, and it names a truncated file as such), another whole-file checksum
    (computed with the algorithm the entry names), or unreadable (an OSError while reading it)."""
    path = manifest.chunk_path(chunk)
    try:
        size = path.stat().st_size
        if size != chunk.bytes:
            return (f"{size} bytes, the manifest says {chunk.bytes} ("
                    + ("truncated" if size < chunk.bytes else "replaced or appended to") + ")")
        if not checksum_matches(path, chunk.checksum):
            return f"checksum differs from the manifest's {chunk.checksum} (same size: bytes changed in place)"
    except FileNotFoundError:
        return "missing"
    except OSError as e:  # a problem to report like the others (the ranks exchange them), not one rank's crash
        return f"unreadable ({type(e).__name__}: {e})"
    return None


def verify_chunks(root: str | os.PathLike) -> list[str]:
    """Checks every chunk listed in root/manifest.json (`chunk_problem`: size, then checksum); returns the paths
    of the chunks that differ (empty: OK). phileo.data.integrity.find_bad_chunks does the same on threads and
    says what differs."""
    m = load_manifest(root)
    return [c.path for c in m.chunks if chunk_problem(m, c) is not None]


def stats_from_histogram(histogram: np.ndarray, bands: Sequence[str],
                         scale: float = float(REFLECTANCE_SCALE)) -> dict[str, Any]:
    """Per-band mean, std, 1st and 99th percentiles from exact uint16 value histograms (bands × 65536), in
    reflectance (DN / scale). Bin 0 (no-data) must already be excluded. Empty bands give NaN-free zeros."""
    h = np.asarray(histogram, dtype=np.float64)
    values = np.arange(h.shape[1], dtype=np.float64)
    n = h.sum(axis=1)
    safe = np.maximum(n, 1)
    mean = (h * values).sum(axis=1) / safe
    var = (h * (values[None, :] - mean[:, None]) ** 2).sum(axis=1) / safe
    cdf = np.cumsum(h, axis=1)

    def pct(q: float) -> list[float]:
        # The smallest value whose cumulative count reaches q of the pixels (the "lower" percentile).
        return [float(np.searchsorted(cdf[b], q * n[b])) / scale if n[b] else 0.0 for b in range(h.shape[0])]

    return {"unit": f"reflectance (DN / {scale:g})", "bands": list(bands),
            "mean": (mean / scale).tolist(), "std": (np.sqrt(var) / scale).tolist(),
            "p01": pct(0.01), "p99": pct(0.99), "n_pixels": n.astype(np.int64).tolist(),
            "excludes": "no-data pixels (value 0)"}
