"""Chunk writing: the planned MajorTOM cells → HDF5 chunk files (format: phileo.data.chunk_format).

The converter's steps, each resumable and each file written under a temporary name and renamed when complete:

1. **Plan** (phileo.data.plan): list, deduplicate, select and chunk the cells into OUT/plan.json + plan.parquet.
2. **Convert** (here) a slice of the chunks (all of them locally; a contiguous range per array task): each chunk
   is converted by one worker process into `OUT/chunks/chunk_NNNNN.h5` with a sidecar `chunk_NNNNN.json`
   (checksum, counts, rejected/skipped cells). Finished chunks are reused on a re-run. A task ends by writing
   its part manifest `OUT/parts/task_TTTTT-of-NNNNN.json`.
3. **Merge** (phileo.data.merge) the part manifests into `OUT/manifest.json`.

The command line is phileo.data.cli (preprocess/majortom_to_h5.py); `convert` runs the three steps locally.

Within a worker two threads decode and check the next cells (GDAL and most numpy work release the GIL) while
the main thread writes the current one, so a worker with two free cores runs at about decoding speed or faster.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from phileo.data import chunk_format as fmt
from phileo.data.chunk_format import grid_offsets, grid_valid, nodata_count_20m, valid_offsets_map
from phileo.data.majortom import CELL_SIZE_PX, Cell, CellError, CellRef, MajorTOMSource
from phileo.data.merge import merge
from phileo.data.plan import ConvertConfig, Plan, load_or_make_plan, task_chunks
from phileo.fsutil import atomic_path, atomic_write_json, make_group_readable, open_h5_read, read_json


def _alloc_blocks(stored: dict[int, list[str]]) -> tuple[dict[int, np.ndarray], dict[str, np.ndarray]]:
    """One uint16 (bands, H, W) block per resolution, and band → its plane (for decoding in place)."""
    blocks = {res: np.empty((len(bs), CELL_SIZE_PX[res], CELL_SIZE_PX[res]), fmt.BAND_DTYPE)
              for res, bs in stored.items() if bs}
    planes = {b: blocks[res][j] for res, bs in stored.items() for j, b in enumerate(bs)}
    return blocks, planes


DECODE_THREADS = 2  # cells decoded at once per worker (GDAL and zlib release the GIL)


class _Prefetcher:
    """Decodes cells on `threads` background threads, at most `depth` cells ahead, and yields them in plan
    order as (ref, Cell | CellError, blocks, checked) where blocks[res] is the (bands, H, W) array the cell's
    bands were decoded into and checked is `check(cell, blocks)` (run on the decoder thread too; None for a
    CellError). With two decoders and the consumer only writing, a worker keeps about two cores busy."""

    def __init__(self, source: MajorTOMSource, refs: Sequence[CellRef], stored: dict[int, list[str]],
                 depth: int | None = None, threads: int | None = None,
                 check: Callable[[Cell, dict[int, np.ndarray]], Any] | None = None):
        from concurrent.futures import ThreadPoolExecutor

        threads = DECODE_THREADS if threads is None else threads
        depth = threads + 1 if depth is None else depth
        self._source, self._refs, self._stored = source, list(refs), stored
        self._bands = stored[10] + stored[20] + stored[60]
        self._depth = max(1, depth)
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="cell-decoder")
        self._pending: list = []
        self._local = threading.local()
        self._check = check

    def _decode(self, ref: CellRef):
        # One source per decoder thread: its cache of open parquet shards is not shared between threads.
        src = getattr(self._local, "source", None)
        if src is None:
            src = self._local.source = copy.copy(self._source)
        # Fresh blocks per cell: the consumer may still be writing the previous ones.
        blocks, planes = _alloc_blocks(self._stored)
        try:
            item = src.read_cell(ref, self._bands, out=planes)
        except CellError as e:
            return ref, e, blocks, None
        return ref, item, blocks, (self._check(item, blocks) if self._check is not None else None)

    def __iter__(self) -> Iterator[tuple[CellRef, Cell | CellError, dict[int, np.ndarray], Any]]:
        # A non-cell fault (I/O error, bug) re-raises here from .result() and stops the chunk.
        todo = iter(self._refs)
        for ref in todo:
            self._pending.append(self._pool.submit(self._decode, ref))
            if len(self._pending) >= self._depth:
                break
        while self._pending:
            item = self._pending.pop(0).result()
            ref = next(todo, None)
            if ref is not None:
                self._pending.append(self._pool.submit(self._decode, ref))
            yield item

    def close(self) -> None:
        for fut in self._pending:
            fut.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)


def convert_chunk(index: int, refs: Sequence[CellRef], cfg_dict: dict[str, Any], fingerprint: str,
                  dataset_dir: str, on_cell: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Converts one planned chunk into `out/chunks/chunk_NNNNN.h5` (+ its `.json` sidecar); returns the sidecar.

    Cells that fail to read (CellError) are listed in `rejected`; cells beyond a threshold in `skipped`; neither
    stops the chunk. Other errors (I/O, bugs) propagate and leave no chunk file behind.
    """
    import h5py

    cfg = ConvertConfig(**cfg_dict)
    out_dir = cfg.out / fmt.CHUNKS_DIR
    stored = cfg.stored_bands
    read_bands = stored[10] + stored[20] + stored[60]
    hist = np.zeros((len(read_bands), fmt.HISTOGRAM_BINS), dtype=fmt.HISTOGRAM_DTYPE)
    meta: dict[str, list] = {k: [] for k in fmt.CELL_STRINGS + tuple(fmt.CELL_DTYPES)}
    t0 = time.time()
    with atomic_path(out_dir / fmt.chunk_name(index)) as tmp:
        with h5py.File(tmp, "w") as f:
            aux = cfg.aux_rasters()
            pixels = create_pixel_datasets(f, len(refs), stored, cfg.compression, aux_targets=tuple(aux))
            n, rejected, skipped = _convert_cells(refs, cfg, dataset_dir, pixels, hist, meta, on_cell, aux)
            for d in pixels.values():
                d.resize(n, axis=0)
            _write_cell_metadata(f, meta, n, len(grid_offsets(cfg.patch_size)))
            f.create_dataset(fmt.BAND_HISTOGRAM, data=hist, compression="gzip", compression_opts=4, shuffle=True)
            f[fmt.STATS].attrs[fmt.STATS_ATTR_BANDS] = json.dumps(read_bands)
            f[fmt.STATS].attrs[fmt.STATS_ATTR_SAMPLING] = fmt.STATS_SAMPLING
            # A dataset, not an attribute: a chunk full of rejected cells can outgrow the 64 KiB attribute limit.
            f.create_dataset(fmt.REPORT, data=json.dumps({"rejected": rejected, "skipped": skipped}),
                             dtype=h5py.string_dtype("utf-8"))
            f.attrs.update({fmt.ATTR_FORMAT: fmt.FORMAT, fmt.ATTR_SCHEMA_VERSION: fmt.SCHEMA_VERSION,
                            fmt.ATTR_CHUNK_INDEX: index, fmt.ATTR_PLAN_FINGERPRINT: fingerprint,
                            **{fmt.ATTR_BANDS[res]: json.dumps(stored[res]) for res in fmt.RESOLUTIONS_M},
                            fmt.ATTR_PATCH_SIZE: cfg.patch_size, fmt.ATTR_MAX_PATCH_NODATA: cfg.max_patch_nodata,
                            fmt.ATTR_COMPRESSION: cfg.compression,
                            **{fmt.ATTR_AUX[k]: str(r.path) for k, r in aux.items()}})
        checksum = fmt.file_checksum(tmp)
        size = tmp.stat().st_size
    entry = _sidecar(index, n, len(refs), checksum, size, int(np.sum(meta[fmt.GRID_VALID])), fingerprint, rejected,
                     skipped, round(time.time() - t0, 3))
    atomic_write_json(out_dir / fmt.sidecar_name(index), entry)
    return entry


def _sidecar(index: int, n_cells: int, planned: int, checksum: str, size: int, n_grid_patches: int,
             fingerprint: str, rejected: list, skipped: list, seconds: float | None) -> dict[str, Any]:
    """The sidecar of a finished chunk (also its entry in the part manifest)."""
    return {"index": index, "path": fmt.chunk_relpath(index), "n_cells": n_cells, "planned": planned,
            "checksum": checksum, "bytes": size, "n_grid_patches": n_grid_patches, "plan_fingerprint": fingerprint,
            "rejected": rejected, "skipped": skipped, "seconds": seconds}


def create_pixel_datasets(f, n_rows: int, stored: dict[int, list[str]], compression: str,
                          aux_targets: Sequence[str] = ()) -> dict[str, Any]:
    """The per-cell pixel datasets of a chunk (bands by resolution, cloud mask, no-data counts, and the aux/
    datasets of `aux_targets`) with `n_rows` rows, resizable along the cell axis; by name."""
    flt = fmt.h5_filter(compression)
    n10, n20, n60 = (CELL_SIZE_PX[r] for r in fmt.RESOLUTIONS_M)
    tiles = {10: fmt.H5_TILE_10M, 20: fmt.H5_TILE_20M, 60: n60}

    def dataset(name, shape, dtype, tile, **kw):
        return f.create_dataset(name, shape=(n_rows, *shape), maxshape=(None, *shape), dtype=dtype,
                                chunks=(1, *tile), **kw)

    out = {}
    for res in fmt.RESOLUTIONS_M:
        if stored[res]:
            px, t = CELL_SIZE_PX[res], tiles[res]
            out[fmt.BANDS[res]] = dataset(fmt.BANDS[res], (len(stored[res]), px, px), fmt.BAND_DTYPE,
                                          (len(stored[res]), t, t), **flt)
    out[fmt.CLOUD_MASK] = dataset(fmt.CLOUD_MASK, (n10, n10), fmt.CLOUD_MASK_DTYPE,
                                  (fmt.H5_TILE_MASK, fmt.H5_TILE_MASK), **flt)
    out[fmt.NODATA_COUNT_20M] = dataset(fmt.NODATA_COUNT_20M, (n20, n20), fmt.NODATA_COUNT_DTYPE, (n20, n20),
                                        compression="gzip", compression_opts=1)
    for target in aux_targets:
        name = fmt.AUX_DATASETS[target]
        out[name] = dataset(name, (n20, n20), fmt.AUX_DTYPES[name], (fmt.H5_TILE_AUX, fmt.H5_TILE_AUX), **flt)
    return out


def _convert_cells(refs: Sequence[CellRef], cfg: ConvertConfig, dataset_dir: str, pixels: dict[str, Any],
                   hist: np.ndarray, meta: dict[str, list], on_cell: Callable[[int], None] | None,
                   aux: dict[str, Any] | None = None) -> tuple[int, list[dict[str, Any]], list[dict[str, Any]]]:
    """Decodes, checks and writes the chunk's cells in plan order; returns (cells written, rejected, skipped)."""
    stored = cfg.stored_bands
    source = MajorTOMSource(cfg.source, layout=refs[0].layout if refs else cfg.layout, use_metadata=False)
    rejected: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    n = 0
    pre = _Prefetcher(source, refs, stored, check=lambda cell, blocks: _check_cell(cell, blocks, stored, cfg, aux))
    try:
        for ref, item, blocks, checked in pre:
            where = ref.describe(dataset_dir)
            if isinstance(item, CellError):
                rejected.append({"grid_cell": ref.grid_cell, "product_id": ref.product_id,
                                 "source": where, "reason": item.reason})
            elif isinstance(checked, str):
                skipped.append({"grid_cell": ref.grid_cell, "product_id": ref.product_id,
                                "source": where, "reason": checked})
            else:
                _write_cell(item, checked, n, pixels, hist, meta)
                meta[fmt.SOURCE].append(where)
                n += 1
            if on_cell is not None:
                on_cell(1)
    finally:
        pre.close()
    return n, rejected, skipped


def _write_cell_metadata(f, meta: dict[str, list], n: int, grid: int) -> None:
    """The cells/ datasets of a chunk of n cells from the lists _write_cell filled (grid: patches a side)."""
    import h5py

    str_dt = h5py.string_dtype("utf-8")
    for k in fmt.CELL_STRINGS:
        f.create_dataset(k, data=np.array(meta[k], dtype=object), dtype=str_dt)
    tails = {fmt.GEOTRANSFORM: (6,), fmt.CLOUD_FRACTION: (4,), fmt.GRID_VALID: (grid, grid)}
    for k, dtype in fmt.CELL_DTYPES.items():
        f.create_dataset(k, data=np.array(meta[k], dtype).reshape(n, *tails.get(k, ())))


def _check_cell(cell: Cell, blocks: dict[int, np.ndarray], stored: dict[int, list[str]],
                cfg: ConvertConfig, aux: dict[str, Any] | None = None) -> dict[str, Any] | str:
    """Checks one decoded cell against the thresholds (on a decoder thread): a skip reason, or what
    _write_cell stores (the blocks, no-data counts, fractions, validity, the cell's histogram rows and the
    auxiliary rasters `aux` sampled onto its 20 m grid)."""
    b10 = _block(blocks, 10, cell, stored)
    b20 = _block(blocks, 20, cell, stored)
    count = nodata_count_20m(b10, b20)
    n10 = CELL_SIZE_PX[10]
    nodata_px = int(count.sum(dtype=np.int64)) if count is not None else 0
    nodata_fraction = nodata_px / (n10 * n10)
    mask = cell.cloud_mask
    # Class counts by comparison: bincount would first widen the 1.1 M uint8 pixels to int64.
    classes = np.array([0] + [np.count_nonzero(mask == k) for k in (1, 2, 3)], dtype=np.int64)
    classes[0] = np.count_nonzero(mask == 0)
    cloud_fraction = classes / mask.size
    if nodata_fraction > cfg.max_cell_nodata:
        return f"no-data fraction {nodata_fraction:.3f} > max_cell_nodata {cfg.max_cell_nodata}"
    if cfg.max_cloud_cover < 100.0:
        if count is None:
            cloudy = classes[1] + classes[2]
            valid_px = mask.size
        else:
            valid = np.repeat(np.repeat(count == 0, 2, axis=0), 2, axis=1)
            cloudy = int(np.count_nonzero(valid & ((mask == 1) | (mask == 2))))
            valid_px = int(np.count_nonzero(valid))
        cover = 100.0 * cloudy / max(valid_px, 1)
        if cover > cfg.max_cloud_cover:
            return f"cloud cover {cover:.1f}% > max_cloud_cover {cfg.max_cloud_cover}%"
    vmap = valid_offsets_map(count, cfg.patch_size, cfg.max_patch_nodata)
    n_pos = (n10 - cfg.patch_size) // 2 + 1
    n_valid = n_pos * n_pos if vmap is None else int(np.count_nonzero(vmap))
    if n_valid == 0:
        return (f"no {cfg.patch_size} px patch with at most {cfg.max_patch_nodata:.0%} no-data "
                f"(cell no-data fraction {nodata_fraction:.3f})")
    # Exact value histograms over a regular subsample (every 80 m): mergeable across chunks and tasks.
    hist = []
    for arr, stride in ((b10, fmt.STATS_ROW_STRIDE_10M), (b20, fmt.STATS_ROW_STRIDE_20M)):
        if arr is None:
            continue
        for band in arr:
            hist.append(np.bincount(band[::stride].ravel(), minlength=fmt.HISTOGRAM_BINS).astype(fmt.HISTOGRAM_DTYPE))
    for b in stored[60]:
        hist.append(np.bincount(cell.bands[b].ravel(), minlength=fmt.HISTOGRAM_BINS).astype(fmt.HISTOGRAM_DTYPE))
    return {"b10": b10, "b20": b20, "b60": _block(blocks, 60, cell, stored), "count": count, "hist": hist,
            "nodata_fraction": nodata_fraction, "cloud_fraction": cloud_fraction, "n_valid": n_valid,
            "grid_valid": grid_valid(vmap, cfg.patch_size),
            "aux": {fmt.AUX_DATASETS[k]: r.sample(cell.crs, cell.transform) for k, r in (aux or {}).items()}}


def _write_cell(cell: Cell, checked: dict[str, Any], n: int, pixels: dict[str, Any], hist: np.ndarray,
                meta: dict[str, list]) -> None:
    """Writes one checked cell (see _check_cell) at row n and adds it to the histograms and the metadata."""
    for res, key in zip(fmt.RESOLUTIONS_M, ("b10", "b20", "b60")):
        if fmt.BANDS[res] in pixels:
            pixels[fmt.BANDS[res]][n] = checked[key]
    pixels[fmt.CLOUD_MASK][n] = cell.cloud_mask
    for name, arr in checked["aux"].items():
        pixels[name][n] = arr
    if checked["count"] is not None:
        pixels[fmt.NODATA_COUNT_20M][n] = checked["count"]
    for j, h in enumerate(checked["hist"]):
        hist[j] += h
    hist[:, 0] = 0
    for k, v in ((fmt.GRID_CELL, cell.grid_cell), (fmt.PRODUCT_ID, cell.product_id), (fmt.TIMESTAMP, cell.timestamp),
                 (fmt.CRS, cell.crs), (fmt.GEOTRANSFORM, cell.transform),
                 (fmt.NODATA_FRACTION, checked["nodata_fraction"]), (fmt.CLOUD_FRACTION, checked["cloud_fraction"]),
                 (fmt.N_VALID_OFFSETS, checked["n_valid"]), (fmt.GRID_VALID, checked["grid_valid"])):
        meta[k].append(v)


def _block(blocks: dict[int, np.ndarray], res: int, cell: Cell, stored: dict[int, list[str]]) -> np.ndarray | None:
    """The (bands, H, W) array of one resolution: the block decoded in place, else a stack of the bands."""
    bands = stored[res]
    if not bands:
        return None
    block = blocks.get(res)
    if block is not None and all(np.shares_memory(cell.bands[b], block) for b in bands):
        return block
    return np.stack([cell.bands[b] for b in bands])


def _existing_chunk(out: Path, index: int, fingerprint: str) -> dict[str, Any] | None:
    """The sidecar of a finished chunk of this plan, or None when the chunk must be (re)converted."""
    h5 = out / fmt.CHUNKS_DIR / fmt.chunk_name(index)
    side = out / fmt.CHUNKS_DIR / fmt.sidecar_name(index)
    if not h5.is_file():
        return None
    if side.is_file():
        try:
            entry = read_json(side, what="chunk sidecar")
        except ValueError:
            entry = None
        if entry and entry.get("plan_fingerprint") == fingerprint and entry.get("bytes") == h5.stat().st_size:
            return entry
    # Killed between the chunk's rename and its sidecar: rebuild the sidecar from the file itself.
    try:
        with open_h5_read(h5) as f:
            if (f.attrs.get(fmt.ATTR_PLAN_FINGERPRINT) != fingerprint
                    or int(f.attrs[fmt.ATTR_CHUNK_INDEX]) != index):
                return None
            report = json.loads(f[fmt.REPORT].asstr()[()])
            n = int(f[fmt.BANDS[10]].shape[0])
            n_grid = int(np.count_nonzero(f[fmt.GRID_VALID][...]))
    except (OSError, KeyError):
        return None
    entry = _sidecar(index, n, n + len(report["rejected"]) + len(report["skipped"]), fmt.file_checksum(h5),
                     h5.stat().st_size, n_grid, fingerprint, report["rejected"], report["skipped"], None)
    atomic_write_json(side, entry)
    return entry


def _remove_stale_temporaries(out: Path, indices: Sequence[int]) -> int:
    """Deletes temporary files left by a killed run for the chunks this task owns."""
    removed = 0
    chunk_dir = out / fmt.CHUNKS_DIR
    if not chunk_dir.is_dir():
        return 0
    for i in indices:
        for stem in (fmt.chunk_name(i), fmt.sidecar_name(i)):
            for tmp in chunk_dir.glob(f".{stem}.*.tmp"):
                tmp.unlink(missing_ok=True)
                removed += 1
    return removed


def _worker_init(q, parent_pid: int | None = None):
    global _PROGRESS_QUEUE
    _PROGRESS_QUEUE = q
    die_with_parent(parent_pid)


def die_with_parent(parent_pid: int | None) -> None:
    """Makes this worker process end when the converter that started it dies (kill -9 included), instead of
    staying behind, hung on its queue, forever (outside SLURM nobody cleans up). Linux: PR_SET_PDEATHSIG, the
    kernel's SIGKILL on the parent's exit; then a check that the parent has not already gone (a race with it)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


_PROGRESS_QUEUE = None


def _worker_convert(args) -> dict[str, Any]:
    index, refs, cfg_dict, fingerprint, dataset_dir = args
    q = _PROGRESS_QUEUE
    return convert_chunk(index, refs, cfg_dict, fingerprint, dataset_dir,
                         on_cell=(lambda k: q.put(k)) if q is not None else None)


def _config_dict(cfg: ConvertConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def convert_task(cfg: ConvertConfig, plan: Plan | None = None) -> dict[str, Any]:
    """Converts this task's slice of the plan's chunks (resuming finished ones) and writes its part manifest.

    Returns the part manifest. Uses cfg.workers processes (spawned) when there is more than one chunk to do.
    """
    plan = plan or load_or_make_plan(cfg)
    indices = list(task_chunks(len(plan.chunks), cfg.task_index, cfg.num_tasks))
    _remove_stale_temporaries(cfg.out, indices)
    (cfg.out / fmt.CHUNKS_DIR).mkdir(parents=True, exist_ok=True)
    make_group_readable(cfg.out / fmt.CHUNKS_DIR, directory=True)
    done: dict[int, dict[str, Any]] = {}
    todo = []
    for i in indices:
        entry = _existing_chunk(cfg.out, i, plan.fingerprint)
        if entry is not None:
            done[i] = entry
        else:
            todo.append(i)
    cfg_dict = _config_dict(cfg)
    n_todo_cells = sum(len(plan.chunks[i]) for i in todo)
    bar = _progress_bar(cfg, n_todo_cells,
                        f"task {cfg.task_index}/{cfg.num_tasks}: {len(todo)} chunk(s) to convert, "
                        f"{len(done)} already done")
    try:
        jobs = [(i, plan.chunks[i], cfg_dict, plan.fingerprint, plan.dataset_dir) for i in todo]
        workers = min(cfg.workers, len(jobs))
        if workers <= 1:
            for job in jobs:
                done[job[0]] = convert_chunk(*job, on_cell=bar.update)
        else:
            done.update(_run_pool(jobs, workers, bar))
    finally:
        bar.close()
    part = {"format": fmt.PART_FORMAT, "schema_version": fmt.SCHEMA_VERSION, "plan_fingerprint": plan.fingerprint,
            "task_index": cfg.task_index, "num_tasks": cfg.num_tasks, "chunks": [done[i] for i in indices],
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_json(cfg.out / fmt.PARTS_DIR / fmt.part_name(cfg.task_index, cfg.num_tasks), part)
    return part


def _run_pool(jobs, workers: int, bar) -> dict[int, dict[str, Any]]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn, not fork: the parent holds pyarrow/HDF5 state and threads that must not be copied mid-flight.
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    stop = threading.Event()

    def pump():
        while not stop.is_set():
            try:
                bar.update(q.get(timeout=0.2))
            except queue.Empty:
                continue
            except (EOFError, OSError):
                return

    pumper = threading.Thread(target=pump, daemon=True)
    pumper.start()
    results: dict[int, dict[str, Any]] = {}
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                 initargs=(q, os.getpid())) as pool:
            futures = {pool.submit(_worker_convert, job): job[0] for job in jobs}
            try:
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
            except BaseException:
                # Let the chunks in flight finish (a re-run reuses them), start no new ones, then re-raise.
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        stop.set()
        pumper.join(timeout=2)
    return results


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(cfg: ConvertConfig, total: int, desc: str):
    if not cfg.progress:
        return _NoBar()
    from tqdm import tqdm

    print(desc, file=sys.stderr, flush=True)
    # In a batch job's log a redraw every few seconds fills the file: refresh rarely when not on a terminal.
    return tqdm(total=total, unit="cell", desc="converting", dynamic_ncols=True,
                mininterval=0.2 if sys.stderr.isatty() else 30.0)


def convert(cfg: ConvertConfig) -> dict[str, Any]:
    """The local path: plan, convert every chunk with cfg.workers processes, merge. Returns the manifest."""
    if cfg.num_tasks != 1:
        raise ValueError("convert() runs everything in one go; for array tasks use convert_task() then merge()")
    plan = load_or_make_plan(cfg)
    convert_task(cfg, plan)
    return merge(cfg.out, nodes=cfg.nodes)

