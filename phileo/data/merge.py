"""Merge: the part manifests of the array tasks → OUT/manifest.json, the one file training reads.

Runs once, after every array task has finished (locally, `convert` calls it). Refuses, naming the array tasks
to re-run, when a planned chunk has no finished part, and when parts disagree about a chunk or a chunk file
changed since its task finished. Band statistics come from the chunks' exact histograms, so they are the same
however the chunks were split among tasks.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from phileo.data import chunk_format as fmt
from phileo.data.majortom import CELL_SIZE_PX, CLOUD_CLASSES
from phileo.data.manifest import ChunkInfo, assign_chunks, stats_from_histogram
from phileo.data.plan import ConvertConfig, Plan, read_plan, task_chunks
from phileo.fsutil import atomic_write_json, read_json
from phileo.ranges import format_ranges


def merge(out: str | os.PathLike, nodes: int = 1) -> dict[str, Any]:
    """Merges the part manifests in `out/parts/` into `out/manifest.json` (atomically) and returns it.

    Refuses (naming the array tasks to re-run) when any planned chunk has no finished part, and when parts
    disagree about a chunk. `nodes` sets the stored assignment; any other node count can be used at training.
    """
    out = Path(out)
    plan = read_plan(out)
    if plan is None:
        raise FileNotFoundError(f"{out / fmt.PLAN_JSON} not found: nothing was converted into {out} yet. Run the "
                                f"converter (without --merge) first")
    entries, seen_tasks = _finished_chunks(out, plan)
    _refuse_missing(out, plan, entries, seen_tasks)
    ordered = [entries[i] for i in range(len(plan.chunks))]
    for e in ordered:
        f = out / e["path"]
        if not f.is_file() or f.stat().st_size != e["bytes"]:
            raise ValueError(f"{f} is missing or has changed since its task finished ({e['bytes']} bytes "
                             f"expected): delete it and its .json sidecar, re-run its task, then --merge")
    chunk_infos = [ChunkInfo(e["index"], e["path"], e["n_cells"], e["checksum"], e["bytes"], e["n_grid_patches"])
                   for e in ordered if e["n_cells"] > 0]
    rejected = list(plan.unreadable) + [r for e in ordered for r in e["rejected"]]
    skipped = [r for e in ordered for r in e["skipped"]]
    if not chunk_infos:
        raise ValueError(f"no cell of {out} survived conversion ({len(rejected)} rejected, {len(skipped)} "
                         f"skipped; see {out}/{fmt.CHUNKS_DIR}/*.json for the reasons)")
    doc = _manifest(out, plan, chunk_infos, rejected, skipped, nodes)
    doc["counts"]["empty_chunks"] = len(ordered) - len(chunk_infos)
    atomic_write_json(out / fmt.MANIFEST_NAME, doc)
    return doc


def _finished_chunks(out: Path, plan: Plan) -> tuple[dict[int, dict[str, Any]], dict[int, set[int]]]:
    """The chunk entries of this plan's part manifests by chunk index, and the task indices seen per task
    count; refuses parts that disagree about a chunk's checksum."""
    entries: dict[int, dict[str, Any]] = {}
    seen_tasks: dict[int, set[int]] = {}
    for p in sorted((out / fmt.PARTS_DIR).glob(fmt.PART_GLOB)):
        part = read_json(p, what="part manifest")
        if part.get("plan_fingerprint") != plan.fingerprint:
            continue  # from an older plan in the same folder; its chunks were redone
        seen_tasks.setdefault(int(part["num_tasks"]), set()).add(int(part["task_index"]))
        for e in part["chunks"]:
            prev = entries.get(int(e["index"]))
            if prev is not None and prev["checksum"] != e["checksum"]:
                raise ValueError(f"parts in {out / fmt.PARTS_DIR} disagree about chunk {e['index']} (checksums "
                                 f"{prev['checksum']} and {e['checksum']}): re-run the task that owns it")
            entries[int(e["index"])] = e
    return entries, seen_tasks


def _refuse_missing(out: Path, plan: Plan, entries: dict[int, Any], seen_tasks: dict[int, set[int]]) -> None:
    """Raises, naming the array tasks that own them, when planned chunks have no finished part."""
    missing = [i for i in range(len(plan.chunks)) if i not in entries]
    if not missing:
        return
    hints = []
    for t, have in sorted(seen_tasks.items()) or [(1, set())]:
        todo = {k for k in range(t) for i in missing if i in task_chunks(len(plan.chunks), k, t)}
        hints.append(f"with --num-tasks {t}: task(s) {format_ranges(todo)} (have {format_ranges(have) or 'none'})")
    raise ValueError(f"cannot merge {out}: {len(missing)} of {len(plan.chunks)} chunks are not finished "
                     f"({format_ranges(missing)}). Re-run the missing array tasks ({'; '.join(hints)}), e.g. "
                     f"sbatch --array=<those task ids> … --array --num-tasks <N>, or re-run the same "
                     f"command without --array to finish them locally; then --merge again")


def _band_histogram(out: Path, chunks: list[ChunkInfo], n_bands: int) -> np.ndarray:
    """The sum of the chunks' exact value histograms (uint64: a whole set can exceed 2^32 per value)."""
    import h5py

    hist = np.zeros((n_bands, fmt.HISTOGRAM_BINS), dtype=np.uint64)
    for c in chunks:
        with h5py.File(out / c.path, "r") as f:
            hist += f[fmt.BAND_HISTOGRAM][...].astype(np.uint64)
    return hist


def _manifest(out: Path, plan: Plan, chunk_infos: list[ChunkInfo], rejected: list[dict[str, Any]],
              skipped: list[dict[str, Any]], nodes: int) -> dict[str, Any]:
    """The manifest document of the finished chunks (see phileo.data.manifest for its reader)."""
    cfg = plan.config
    stored = ConvertConfig(source=None, out=out, bands=tuple(cfg["bands"])).stored_bands
    bands = stored[10] + stored[20] + stored[60]
    n_cells = sum(c.n_cells for c in chunk_infos)
    n_nodes_ok = min(nodes, len(chunk_infos))
    assignment = assign_chunks(chunk_infos, n_nodes_ok)
    counts = dict(plan.counts)
    counts.update({"converted": n_cells, "rejected": len(rejected), "skipped": len(skipped),
                   "chunks": len(chunk_infos)})
    scale = fmt.REFLECTANCE_SCALE
    doc = {
        "format": fmt.FORMAT, "schema_version": fmt.SCHEMA_VERSION, "plan_fingerprint": plan.fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": {"dataset_dir": plan.dataset_dir, "layout": _layout_of(plan)},
        "config": cfg,
        "bands": bands, "bands_10m": stored[10], "bands_20m": stored[20], "bands_60m": stored[60],
        "cell_size_px": {"10m": CELL_SIZE_PX[10], "20m": CELL_SIZE_PX[20], "60m": CELL_SIZE_PX[60]},
        "normalisation": {"stored": f"uint16 reflectance x {scale} at native resolution (lossless)",
                          "served": f"float32 reflectance = value / {scale}; 20 m bands bilinearly upsampled x2 "
                                    "(align_corners=False) to 10 m; order " + " ".join(stored[10] + stored[20]),
                          "scale": scale},
        "cloud_classes": list(CLOUD_CLASSES),
        "patch_size": int(cfg["patch_size"]), "max_patch_nodata": float(cfg["max_patch_nodata"]),
        "compression": cfg["compression"],
        "num_cells": n_cells,
        "counts": counts,
        "stats": stats_from_histogram(_band_histogram(out, chunk_infos, len(bands)), bands, scale=scale),
        "chunks": [c.to_dict() for c in chunk_infos],
        "assignment": {"num_nodes": n_nodes_ok, "rule": "phileo.data.assign_chunks: largest chunk first to the "
                       "node with the fewest cells; any node count up to the number of chunks works",
                       "nodes": [[c.index for c in node] for node in assignment],
                       "cells_per_node": [sum(c.n_cells for c in node) for node in assignment]},
        "rejected": rejected, "skipped": skipped, "duplicates": plan.duplicates,
        "not_present_shards": plan.not_present_shards,
    }
    if n_nodes_ok < nodes:
        doc["assignment"]["note"] = (f"asked for {nodes} nodes but only {len(chunk_infos)} chunks exist; "
                                     f"re-convert with a smaller --cells-per-chunk to use more nodes")
    return doc


def _layout_of(plan: Plan) -> str:
    for chunk in plan.chunks:
        for r in chunk:
            return r.layout
    return "unknown"
