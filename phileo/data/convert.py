"""MajorTOM Core-S2L2A → HDF5 chunk files + manifest, locally with K worker processes or as a SLURM job array.

Steps (each resumable, each file written under a temporary name and renamed when complete):

1. **Plan** (`OUT/plan.json` + `OUT/plan.parquet`): list the cells of the source (from metadata.parquet when
   present, else from the shards/tree themselves), drop duplicate (grid_cell, product_id) rows (keeping the
   first in reading order), apply --limit/--sample, and cut the cells into chunks of --cells-per-chunk
   consecutive cells. Deterministic: every array task computes (or reads) the same plan.
2. **Convert** a slice of the chunks (all of them locally; a contiguous range per array task): each chunk is
   converted by one worker process into `OUT/chunks/chunk_NNNNN.h5` with a sidecar `chunk_NNNNN.json`
   (checksum, counts, rejected/skipped cells). Finished chunks are reused on a re-run. A task ends by writing
   its part manifest `OUT/parts/task_TTTTT-of-NNNNN.json`.
3. **Merge** the part manifests into `OUT/manifest.json` (atomic): chunks, checksums, the node assignment,
   counts, every rejected/skipped/duplicate cell, and per-band statistics from the chunks' exact histograms.

Within a worker two threads decode and check the next cells (GDAL and most numpy work release the GIL) while
the main thread writes the current one, so a worker with two free cores runs at about decoding speed or faster.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import queue
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from phileo.data.majortom import (ALL_BANDS, BAND_RESOLUTION_M, BANDS_60M, CELL_SIZE_PX, CLOUD_CLASSES, Cell,
                                  CellError, CellRef, MajorTOMSource, PHILEO_BANDS)
from phileo.data.manifest import (FORMAT, MANIFEST_NAME, SCHEMA_VERSION, ChunkInfo, assign_chunks,
                                  stats_from_histogram)
from phileo.fsutil import atomic_path, atomic_write_json, make_group_readable, open_h5_read, read_json

COMPRESSIONS = ("lz4", "zstd", "gzip", "none")
DEFAULT_CELLS_PER_CHUNK = 256  # ~3.5 GB raw per chunk on real data: few files, still many more than nodes
CHUNKS_PER_NODE_TARGET = 8     # auto chunk size keeps at least this many chunks per node when cells allow
# HDF5 chunk shapes: one cell, all bands of a resolution, 89 px tiles. 89 divides 1068 and 534, so no tile is
# partial; a 128 px crop reads 4-9 tiles at 10 m and 1-4 at 20 m. Measured here against 64/32 px tiles: 40 %
# less CPU to write, ~10 % fewer patches/s to read (both far above their goals).
H5_TILE_10M = 89
H5_TILE_20M = 89
H5_TILE_MASK = 178
# Histograms sample every 8th 10 m row and every 4th 20 m row (the same 80 m spacing): exact counts of a
# regular 1/8 sample, at a fraction of the cost of counting every pixel of every cell.
STATS_ROW_STRIDE_10M = 8
STATS_ROW_STRIDE_20M = 4


@dataclass
class ConvertConfig:
    """Everything that decides what the converter writes (plus how fast: workers, progress).

    Refused when built: unknown bands, a band listed twice, patch sizes that are not even or do not fit in a
    cell, fractions outside [0, 1], limit together with sample, impossible task indices.
    """

    source: Path | None
    out: Path
    nodes: int = 1
    workers: int = 1
    layout: str | None = None                # None: auto-detect
    use_metadata: bool | None = None         # None: use metadata.parquet when present
    bands: tuple[str, ...] = PHILEO_BANDS
    patch_size: int = 128
    max_patch_nodata: float = 0.1            # PhilEO Bench's patch rule
    max_cell_nodata: float = 1.0             # cells above are skipped (default: keep any cell with a valid patch)
    max_cloud_cover: float = 100.0           # percent of thick+thin cloud over the valid pixels
    limit: int | None = None
    sample: int | None = None
    sample_seed: int = 0
    cells_per_chunk: int | None = None       # None: auto
    compression: str = "lz4"
    task_index: int = 0
    num_tasks: int = 1
    progress: bool = True

    def __post_init__(self):
        self.out = Path(self.out)
        self.source = Path(self.source) if self.source is not None else None
        self.bands = tuple(self.bands)
        unknown = [b for b in self.bands if b not in BAND_RESOLUTION_M]
        if unknown:
            raise ValueError(f"unknown band(s) {unknown}: MajorTOM S2L2A bands are {', '.join(ALL_BANDS)}")
        if len(set(self.bands)) != len(self.bands):
            raise ValueError(f"a band is listed twice in {self.bands}")
        if not any(BAND_RESOLUTION_M[b] == 10 for b in self.bands):
            raise ValueError("bands must include at least one 10 m band (B02, B03, B04, B08)")
        if self.patch_size % 2 or not 2 <= self.patch_size <= CELL_SIZE_PX[10]:
            raise ValueError(f"patch_size must be even (20 m-aligned) and at most {CELL_SIZE_PX[10]}, "
                             f"got {self.patch_size}")
        for name in ("max_patch_nodata", "max_cell_nodata"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a fraction in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.max_cloud_cover <= 100.0:
            raise ValueError(f"max_cloud_cover is a percentage in [0, 100], got {self.max_cloud_cover}")
        if self.limit is not None and self.sample is not None:
            raise ValueError("give either limit (the first N cells) or sample (N random cells), not both")
        for name in ("limit", "sample", "cells_per_chunk"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if self.nodes < 1 or self.workers < 1:
            raise ValueError("nodes and workers must be >= 1")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS} (all lossless), got {self.compression!r}")
        if not 0 <= self.task_index < self.num_tasks:
            raise ValueError(f"task_index must be in [0, num_tasks={self.num_tasks}), got {self.task_index}")

    @property
    def stored_bands(self) -> dict[int, list[str]]:
        """Bands by resolution in PhilEO order (10 m B02 B03 B04 B08, 20 m B05 … B12), then 60 m."""
        order = list(PHILEO_BANDS) + list(BANDS_60M)
        return {res: [b for b in order if b in self.bands and BAND_RESOLUTION_M[b] == res] for res in (10, 20, 60)}

    def content_fingerprint(self) -> dict[str, Any]:
        """The arguments that decide what is written (not how fast or by which task)."""
        return {"source": str(self.source.absolute()) if self.source else None, "layout": self.layout,
                "use_metadata": self.use_metadata, "bands": list(self.bands), "patch_size": self.patch_size,
                "max_patch_nodata": self.max_patch_nodata, "max_cell_nodata": self.max_cell_nodata,
                "max_cloud_cover": self.max_cloud_cover, "limit": self.limit, "sample": self.sample,
                "sample_seed": self.sample_seed, "cells_per_chunk": self.cells_per_chunk,
                "compression": self.compression}


# ------------------------------------------------------------------------------------------------------ plan
PLAN_JSON = "plan.json"
PLAN_CELLS = "plan.parquet"
_PLAN_COLUMNS = ("chunk", "path", "row_group", "row", "grid_cell", "product_id", "layout", "timestamp")


@dataclass
class Plan:
    """Which cells go into which chunk; `fingerprint` identifies it in every file the conversion writes."""

    fingerprint: str
    config: dict[str, Any]
    cells_per_chunk: int
    chunks: list[list[CellRef]]
    dataset_dir: str
    counts: dict[str, int]
    duplicates: list[dict[str, Any]]
    not_present_shards: list[str]
    unreadable: list[dict[str, Any]]


def _dedupe(refs: list[CellRef], dataset_dir: Path) -> tuple[list[CellRef], list[dict[str, Any]]]:
    seen: dict[tuple[str, str], CellRef] = {}
    kept, dups = [], []
    for r in refs:
        first = seen.get(r.key)
        if first is None:
            seen[r.key] = r
            kept.append(r)
        else:
            dups.append({"grid_cell": r.grid_cell, "product_id": r.product_id,
                         "dropped": r.describe(dataset_dir), "kept": first.describe(dataset_dir)})
    return kept, dups


def _resolve_cells_per_chunk(cfg: ConvertConfig, n_cells: int) -> int:
    if cfg.cells_per_chunk is not None:
        return cfg.cells_per_chunk
    # Enough chunks that the set can later be read by several times more nodes than it was converted for.
    return max(1, min(DEFAULT_CELLS_PER_CHUNK, n_cells // (CHUNKS_PER_NODE_TARGET * cfg.nodes)))


def make_plan(cfg: ConvertConfig) -> Plan:
    """Lists, deduplicates, selects and chunks the source's cells (no image is decoded)."""
    if cfg.source is None:
        raise ValueError("--source is needed to plan a conversion")
    src = MajorTOMSource(cfg.source, layout=cfg.layout, use_metadata=cfg.use_metadata)
    refs = src.list_cells()
    listed = len(refs)
    kept, dups = _dedupe(refs, src.dataset_dir)
    selected = kept
    if cfg.limit is not None:
        selected = kept[: cfg.limit]
    elif cfg.sample is not None and cfg.sample < len(kept):
        rng = np.random.default_rng(cfg.sample_seed)
        pick = np.sort(rng.choice(len(kept), size=cfg.sample, replace=False))
        selected = [kept[i] for i in pick]
    if not selected:
        why = f"; unreadable: {src.unreadable[0]['reason']}" if src.unreadable else ""
        raise ValueError(f"no cells to convert in {src.dataset_dir} ({listed} listed{why}): check --source, "
                         f"--layout and --limit/--sample")
    cpc = _resolve_cells_per_chunk(cfg, len(selected))
    chunks = [selected[i:i + cpc] for i in range(0, len(selected), cpc)]
    config = cfg.content_fingerprint()
    config["cells_per_chunk"] = cpc
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for r in selected:
        digest.update(f"{r.path}\0{r.row_group}\0{r.row}\0{r.grid_cell}\0{r.product_id}\n".encode())
    counts = {"listed": listed, "duplicates": len(dups), "not_present_in_download": src.not_present_cells,
              "unreadable_at_listing": len(src.unreadable), "after_dedup": len(kept), "planned": len(selected),
              "chunks": len(chunks)}
    return Plan(digest.hexdigest()[:16], config, cpc, chunks, str(src.dataset_dir), counts, dups,
                list(src.not_present), list(src.unreadable))


def _write_plan(out: Path, plan: Plan) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {c: [] for c in _PLAN_COLUMNS}
    for k, chunk in enumerate(plan.chunks):
        for r in chunk:
            for c, v in zip(_PLAN_COLUMNS, (k, r.path, r.row_group, r.row, r.grid_cell, r.product_id, r.layout,
                                            r.timestamp)):
                rows[c].append(v)
    table = pa.table({c: pa.array(v, type=pa.string() if c == "timestamp" else None) for c, v in rows.items()})
    with atomic_path(out / PLAN_CELLS) as tmp:
        pq.write_table(table, tmp)
    # plan.json last: its presence means the plan is complete.
    atomic_write_json(out / PLAN_JSON, {
        "format": FORMAT + "-plan", "schema_version": SCHEMA_VERSION, "fingerprint": plan.fingerprint,
        "config": plan.config, "cells_per_chunk": plan.cells_per_chunk, "dataset_dir": plan.dataset_dir,
        "n_chunks": len(plan.chunks), "counts": plan.counts, "duplicates": plan.duplicates,
        "not_present_shards": plan.not_present_shards, "unreadable": plan.unreadable})


def _read_plan(out: Path) -> Plan | None:
    import pyarrow.parquet as pq

    if not (out / PLAN_JSON).is_file():
        return None
    doc = read_json(out / PLAN_JSON, what="conversion plan")
    try:
        t = pq.read_table(out / PLAN_CELLS).to_pydict()
    except (OSError, ValueError) as e:
        raise ValueError(f"{out / PLAN_CELLS} does not read ({e}) although {out / PLAN_JSON} exists: delete "
                         f"both and re-run the same command (finished chunks are kept if the plan is the "
                         f"same)") from None
    chunks: list[list[CellRef]] = [[] for _ in range(int(doc["n_chunks"]))]
    for k, p, rg, r, gc, pid, lay, ts in zip(*(t[c] for c in _PLAN_COLUMNS)):
        chunks[k].append(CellRef(p, rg, r, gc, pid, lay, ts))
    return Plan(doc["fingerprint"], doc["config"], int(doc["cells_per_chunk"]), chunks, doc["dataset_dir"],
                doc["counts"], doc["duplicates"], doc.get("not_present_shards", []), doc.get("unreadable", []))


def load_or_make_plan(cfg: ConvertConfig) -> Plan:
    """The plan in cfg.out if one exists and was made with the same arguments, else a new one (written).

    Refuses to mix: an existing plan made with other content arguments raises, naming the differences.
    """
    existing = _read_plan(cfg.out)
    if existing is not None:
        want = cfg.content_fingerprint()
        have = dict(existing.config)
        if want["cells_per_chunk"] is None:  # auto: whatever the plan resolved it to
            want["cells_per_chunk"] = have.get("cells_per_chunk")
        if cfg.source is None:  # resuming from OUT alone: the plan knows the source
            want["source"] = have.get("source")
            cfg.source = Path(have["source"]) if have.get("source") else None
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if diff:
            details = ", ".join(f"{k}: {have.get(k)!r} there, {want.get(k)!r} now" for k in diff)
            raise ValueError(f"{cfg.out / PLAN_JSON} was made with other arguments ({details}). Re-run with the "
                             f"same arguments to resume, or convert into a new --out folder")
        return existing
    plan = make_plan(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    make_group_readable(cfg.out, directory=True)
    _write_plan(cfg.out, plan)
    return plan


def task_chunks(n_chunks: int, task_index: int, num_tasks: int) -> range:
    """The contiguous range of chunk indices array task `task_index` of `num_tasks` converts."""
    return range(task_index * n_chunks // num_tasks, (task_index + 1) * n_chunks // num_tasks)


# ------------------------------------------------------------------------------------------ per-cell checks
def nodata_count_20m(b10: np.ndarray, b20: np.ndarray | None) -> np.ndarray | None:
    """No-data 10 m pixels (0 in any stored 10/20 m band) counted per 20 m pixel: uint8 (534, 534) in 0-4, or
    None when the cell has no zero at all (the common case, decided by a cheap min)."""
    if b10.min() > 0 and (b20 is None or b20.size == 0 or b20.min() > 0):
        return None
    n20 = CELL_SIZE_PX[20]
    nd10 = (b10 == 0).any(axis=0)
    count = nd10.reshape(n20, 2, n20, 2).sum(axis=(1, 3), dtype=np.uint8)
    if b20 is not None and b20.size:
        count[(b20 == 0).any(axis=0)] = 4
    return count


def valid_offsets_map(count20: np.ndarray | None, patch_size: int, max_nodata: float) -> np.ndarray | None:
    """bool (P, P) over even crop offsets (row_off = 2·i, col_off = 2·j): True where the patch_size crop has at
    most max_nodata of its pixels no-data. None when the cell has no no-data (every offset valid)."""
    if count20 is None:
        return None
    half = patch_size // 2
    ii = np.zeros((count20.shape[0] + 1, count20.shape[1] + 1), dtype=np.int64)
    np.cumsum(np.cumsum(count20, axis=0, dtype=np.int64), axis=1, out=ii[1:, 1:])
    sums = ii[half:, half:] - ii[:-half, half:] - ii[half:, :-half] + ii[:-half, :-half]
    return sums <= max_nodata * patch_size * patch_size


def grid_offsets(patch_size: int) -> np.ndarray:
    """Row (= column) offsets of the fixed non-overlapping patch grid in a cell: 0, p, 2p, … (all even)."""
    return np.arange(CELL_SIZE_PX[10] // patch_size) * patch_size


def grid_valid(valid_map: np.ndarray | None, patch_size: int) -> np.ndarray:
    """bool (G, G): which grid patches (see grid_offsets) are servable."""
    g = grid_offsets(patch_size) // 2
    if valid_map is None:
        return np.ones((len(g), len(g)), dtype=bool)
    return valid_map[np.ix_(g, g)]


# ------------------------------------------------------------------------------------------ chunk writing
def _h5_filter(compression: str) -> dict[str, Any]:
    if compression == "none":
        return {}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    import hdf5plugin

    # Blosc with byte shuffle: uint16 reflectance compresses ~2x; level 1 is nearly as small as 5 and faster.
    cname = {"lz4": "lz4", "zstd": "zstd"}[compression]
    return dict(hdf5plugin.Blosc(cname=cname, clevel=1 if cname == "lz4" else 3, shuffle=hdf5plugin.Blosc.SHUFFLE))


def chunk_name(index: int) -> str:
    return f"chunk_{index:05d}.h5"


CHECKSUM_ALGORITHM = "crc32"  # of the whole chunk file; older manifests recorded sha256 (still verified)
_CHECKSUM_BLOCK = 1 << 20


def file_checksum(path: str | os.PathLike, algorithm: str = CHECKSUM_ALGORITHM) -> str:
    """'<algorithm>:<hex>' of the whole file, streamed through one reused buffer.

    crc32 (zlib, the default) detects corruption and truncation at ~3.5 GB/s, 2.4x sha256 with SHA-NI: the
    converter checksums every chunk it writes. sha256 is still computed for manifests that recorded it.
    """
    if algorithm == "crc32":
        crc, update = 0, None
    elif algorithm == "sha256":
        h = hashlib.new(algorithm)
        update = h.update
    else:
        raise ValueError(f"unknown checksum algorithm {algorithm!r} (crc32 or sha256)")
    buf = bytearray(_CHECKSUM_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            if update is None:
                crc = zlib.crc32(view[:n], crc)
            else:
                update(view[:n])
    return f"crc32:{crc:08x}" if update is None else f"{algorithm}:{h.hexdigest()}"


def checksum_matches(path: str | os.PathLike, checksum: str) -> bool:
    """Whether the file's checksum, computed with the algorithm `checksum` names ('crc32:…', 'sha256:…'), is
    `checksum`. False for an unknown algorithm."""
    algorithm, _, _ = checksum.partition(":")
    try:
        return file_checksum(path, algorithm) == checksum
    except ValueError:
        return False


def _alloc_blocks(stored: dict[int, list[str]]) -> tuple[dict[int, np.ndarray], dict[str, np.ndarray]]:
    """One uint16 (bands, H, W) block per resolution, and band → its plane (for decoding in place)."""
    blocks = {res: np.empty((len(bs), CELL_SIZE_PX[res], CELL_SIZE_PX[res]), np.uint16)
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
    out_dir = cfg.out / "chunks"
    final = out_dir / chunk_name(index)
    stored = cfg.stored_bands
    read_bands = stored[10] + stored[20] + stored[60]
    n_plan = len(refs)
    p = cfg.patch_size
    g = len(grid_offsets(p))
    flt = _h5_filter(cfg.compression)
    n10, n20, n60 = (CELL_SIZE_PX[r] for r in (10, 20, 60))
    # uint32 is enough per chunk: 256 cells x 1068 x 1068 px is 2.9e8 < 2^32.
    hist = np.zeros((len(read_bands), 65536), dtype=np.uint32)
    rejected: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    meta: dict[str, list] = {k: [] for k in ("grid_cell", "product_id", "timestamp", "crs", "geotransform",
                                             "source", "nodata_fraction", "cloud_fraction", "n_valid_offsets",
                                             "grid_valid")}
    source = MajorTOMSource(cfg.source, layout=refs[0].layout if refs else cfg.layout, use_metadata=False)
    t0 = time.time()
    with atomic_path(final) as tmp:
        with h5py.File(tmp, "w") as f:
            def dataset(name, shape, dtype, tile, **kw):
                return f.create_dataset(name, shape=(n_plan, *shape), maxshape=(None, *shape), dtype=dtype,
                                        chunks=(1, *tile), **kw)

            d10 = dataset("bands_10m", (len(stored[10]), n10, n10), np.uint16,
                          (len(stored[10]), H5_TILE_10M, H5_TILE_10M), **flt)
            d20 = (dataset("bands_20m", (len(stored[20]), n20, n20), np.uint16,
                           (len(stored[20]), H5_TILE_20M, H5_TILE_20M), **flt) if stored[20] else None)
            d60 = (dataset("bands_60m", (len(stored[60]), n60, n60), np.uint16, (len(stored[60]), n60, n60), **flt)
                   if stored[60] else None)
            dmask = dataset("cloud_mask", (n10, n10), np.uint8, (H5_TILE_MASK, H5_TILE_MASK), **flt)
            dnod = dataset("nodata_count_20m", (n20, n20), np.uint8, (n20, n20), compression="gzip",
                           compression_opts=1)
            n = 0
            pre = _Prefetcher(source, refs, stored, check=lambda cell, blocks: _check_cell(cell, blocks, stored, cfg))
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
                        _write_cell(item, checked, n, d10, d20, d60, dmask, dnod, hist, meta)
                        meta["source"].append(where)
                        n += 1
                    if on_cell is not None:
                        on_cell(1)
            finally:
                pre.close()
            for d in (d10, d20, d60, dmask, dnod):
                if d is not None:
                    d.resize(n, axis=0)
            cells = f.create_group("cells")
            str_dt = h5py.string_dtype("utf-8")
            for k in ("grid_cell", "product_id", "timestamp", "crs", "source"):
                cells.create_dataset(k, data=np.array(meta[k], dtype=object), dtype=str_dt)
            cells.create_dataset("geotransform", data=np.array(meta["geotransform"], np.float64).reshape(n, 6))
            cells.create_dataset("nodata_fraction", data=np.array(meta["nodata_fraction"], np.float32))
            cells.create_dataset("cloud_fraction", data=np.array(meta["cloud_fraction"], np.float32).reshape(n, 4))
            cells.create_dataset("n_valid_offsets", data=np.array(meta["n_valid_offsets"], np.int64))
            cells.create_dataset("grid_valid", data=np.array(meta["grid_valid"], bool).reshape(n, g, g))
            stats = f.create_group("stats")
            stats.create_dataset("band_histogram", data=hist, compression="gzip", compression_opts=4, shuffle=True)
            stats.attrs["bands"] = json.dumps(read_bands)
            stats.attrs["sampling"] = (f"every {STATS_ROW_STRIDE_10M}th 10 m row, every {STATS_ROW_STRIDE_20M}th "
                                       f"20 m row, every 60 m row; value 0 (no-data) excluded")
            # A dataset, not an attribute: a chunk full of rejected cells can outgrow the 64 KiB attribute limit.
            f.create_dataset("report", data=json.dumps({"rejected": rejected, "skipped": skipped}), dtype=str_dt)
            f.attrs.update({"format": FORMAT, "schema_version": SCHEMA_VERSION, "chunk_index": index,
                            "plan_fingerprint": fingerprint, "bands_10m": json.dumps(stored[10]),
                            "bands_20m": json.dumps(stored[20]), "bands_60m": json.dumps(stored[60]),
                            "patch_size": p, "max_patch_nodata": cfg.max_patch_nodata,
                            "compression": cfg.compression})
        checksum = file_checksum(tmp)
        size = tmp.stat().st_size
    entry = {"index": index, "path": f"chunks/{chunk_name(index)}", "n_cells": n, "planned": n_plan,
             "checksum": checksum, "bytes": size, "n_grid_patches": int(np.sum(meta["grid_valid"])),
             "plan_fingerprint": fingerprint, "rejected": rejected, "skipped": skipped,
             "seconds": round(time.time() - t0, 3)}
    atomic_write_json(out_dir / (chunk_name(index)[:-3] + ".json"), entry)
    return entry


def _check_cell(cell: Cell, blocks: dict[int, np.ndarray], stored: dict[int, list[str]],
                cfg: ConvertConfig) -> dict[str, Any] | str:
    """Checks one decoded cell against the thresholds (on a decoder thread): a skip reason, or what
    _write_cell stores (the blocks, no-data counts, fractions, validity and the cell's histogram rows)."""
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
    for arr, stride in ((b10, STATS_ROW_STRIDE_10M), (b20, STATS_ROW_STRIDE_20M)):
        if arr is None:
            continue
        for band in arr:
            hist.append(np.bincount(band[::stride].ravel(), minlength=65536).astype(np.uint32))
    for b in stored[60]:
        hist.append(np.bincount(cell.bands[b].ravel(), minlength=65536).astype(np.uint32))
    return {"b10": b10, "b20": b20, "b60": _block(blocks, 60, cell, stored), "count": count, "hist": hist,
            "nodata_fraction": nodata_fraction, "cloud_fraction": cloud_fraction, "n_valid": n_valid,
            "grid_valid": grid_valid(vmap, cfg.patch_size)}


def _write_cell(cell: Cell, checked: dict[str, Any], n: int, d10, d20, d60, dmask, dnod, hist: np.ndarray,
                meta: dict[str, list]) -> None:
    """Writes one checked cell (see _check_cell) at row n and adds it to the histograms and the metadata."""
    d10[n] = checked["b10"]
    if d20 is not None:
        d20[n] = checked["b20"]
    if d60 is not None:
        d60[n] = checked["b60"]
    dmask[n] = cell.cloud_mask
    if checked["count"] is not None:
        dnod[n] = checked["count"]
    for j, h in enumerate(checked["hist"]):
        hist[j] += h
    hist[:, 0] = 0
    meta["grid_cell"].append(cell.grid_cell)
    meta["product_id"].append(cell.product_id)
    meta["timestamp"].append(cell.timestamp)
    meta["crs"].append(cell.crs)
    meta["geotransform"].append(cell.transform)
    meta["nodata_fraction"].append(checked["nodata_fraction"])
    meta["cloud_fraction"].append(checked["cloud_fraction"])
    meta["n_valid_offsets"].append(checked["n_valid"])
    meta["grid_valid"].append(checked["grid_valid"])


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
    h5 = out / "chunks" / chunk_name(index)
    side = out / "chunks" / (chunk_name(index)[:-3] + ".json")
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
            if f.attrs.get("plan_fingerprint") != fingerprint or int(f.attrs["chunk_index"]) != index:
                return None
            report = json.loads(f["report"].asstr()[()])
            n = int(f["bands_10m"].shape[0])
            n_grid = int(np.count_nonzero(f["cells/grid_valid"][...]))
    except (OSError, KeyError):
        return None
    entry = {"index": index, "path": f"chunks/{chunk_name(index)}", "n_cells": n,
             "planned": n + len(report["rejected"]) + len(report["skipped"]), "checksum": file_checksum(h5),
             "bytes": h5.stat().st_size, "n_grid_patches": n_grid, "plan_fingerprint": fingerprint,
             "rejected": report["rejected"], "skipped": report["skipped"], "seconds": None}
    atomic_write_json(side, entry)
    return entry


def _remove_stale_temporaries(out: Path, indices: Sequence[int]) -> int:
    """Deletes temporary files left by a killed run for the chunks this task owns."""
    removed = 0
    chunk_dir = out / "chunks"
    if not chunk_dir.is_dir():
        return 0
    for i in indices:
        for stem in (chunk_name(i), chunk_name(i)[:-3] + ".json"):
            for tmp in chunk_dir.glob(f".{stem}.*.tmp"):
                tmp.unlink(missing_ok=True)
                removed += 1
    return removed


def part_name(task_index: int, num_tasks: int) -> str:
    return f"task_{task_index:05d}-of-{num_tasks:05d}.json"


def _worker_init(q):
    global _PROGRESS_QUEUE
    _PROGRESS_QUEUE = q


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
    (cfg.out / "chunks").mkdir(parents=True, exist_ok=True)
    make_group_readable(cfg.out / "chunks", directory=True)
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
    part = {"format": FORMAT + "-part", "schema_version": SCHEMA_VERSION, "plan_fingerprint": plan.fingerprint,
            "task_index": cfg.task_index, "num_tasks": cfg.num_tasks, "chunks": [done[i] for i in indices],
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_json(cfg.out / "parts" / part_name(cfg.task_index, cfg.num_tasks), part)
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
                                 initargs=(q,)) as pool:
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


# ------------------------------------------------------------------------------------------------------ merge
def merge(out: str | os.PathLike, nodes: int = 1) -> dict[str, Any]:
    """Merges the part manifests in `out/parts/` into `out/manifest.json` (atomically) and returns it.

    Refuses (naming the array tasks to re-run) when any planned chunk has no finished part, and when parts
    disagree about a chunk. `nodes` sets the stored assignment; any other node count can be used at training.
    """
    out = Path(out)
    plan = _read_plan(out)
    if plan is None:
        raise FileNotFoundError(f"{out / PLAN_JSON} not found: nothing was converted into {out} yet. Run the "
                                f"converter (without --merge) first")
    entries: dict[int, dict[str, Any]] = {}
    seen_tasks: dict[int, set[int]] = {}
    for p in sorted((out / "parts").glob("task_*-of-*.json")):
        part = read_json(p, what="part manifest")
        if part.get("plan_fingerprint") != plan.fingerprint:
            continue  # from an older plan in the same folder; its chunks were redone
        seen_tasks.setdefault(int(part["num_tasks"]), set()).add(int(part["task_index"]))
        for e in part["chunks"]:
            prev = entries.get(int(e["index"]))
            if prev is not None and prev["checksum"] != e["checksum"]:
                raise ValueError(f"parts in {out / 'parts'} disagree about chunk {e['index']} (checksums "
                                 f"{prev['checksum']} and {e['checksum']}): re-run the task that owns it")
            entries[int(e["index"])] = e
    missing = [i for i in range(len(plan.chunks)) if i not in entries]
    if missing:
        hints = []
        for t, have in sorted(seen_tasks.items()) or [(1, set())]:
            todo = sorted({k for k in range(t) for i in missing if i in task_chunks(len(plan.chunks), k, t)})
            hints.append(f"with --num-tasks {t}: task(s) {_ranges(todo)} (have {_ranges(sorted(have)) or 'none'})")
        raise ValueError(f"cannot merge {out}: {len(missing)} of {len(plan.chunks)} chunks are not finished "
                         f"({_ranges(missing)}). Re-run the missing array tasks ({'; '.join(hints)}), e.g. "
                         f"sbatch --array=<those task ids> … --array --num-tasks <N>, or re-run the same "
                         f"command without --array to finish them locally; then --merge again")
    ordered = [entries[i] for i in range(len(plan.chunks))]
    for e in ordered:
        f = out / e["path"]
        if not f.is_file() or f.stat().st_size != e["bytes"]:
            raise ValueError(f"{f} is missing or has changed since its task finished ({e['bytes']} bytes "
                             f"expected): delete it and its .json sidecar, re-run its task, then --merge")
    chunk_infos = [ChunkInfo(e["index"], e["path"], e["n_cells"], e["checksum"], e["bytes"], e["n_grid_patches"])
                   for e in ordered if e["n_cells"] > 0]
    cfg = plan.config
    stored = ConvertConfig(source=None, out=out, bands=tuple(cfg["bands"])).stored_bands
    bands = stored[10] + stored[20] + stored[60]
    hist = np.zeros((len(bands), 65536), dtype=np.uint64)
    for c in chunk_infos:
        with open_h5_read(out / c.path) as f:
            hist += f["stats/band_histogram"][...].astype(np.uint64)
    rejected = list(plan.unreadable) + [r for e in ordered for r in e["rejected"]]
    skipped = [r for e in ordered for r in e["skipped"]]
    n_cells = sum(c.n_cells for c in chunk_infos)
    if not chunk_infos:
        raise ValueError(f"no cell of {out} survived conversion ({len(rejected)} rejected, {len(skipped)} "
                         f"skipped; see {out}/chunks/*.json for the reasons)")
    n_nodes_ok = min(nodes, len(chunk_infos))
    assignment = assign_chunks(chunk_infos, n_nodes_ok)
    counts = dict(plan.counts)
    counts.update({"converted": n_cells, "rejected": len(rejected), "skipped": len(skipped),
                   "chunks": len(chunk_infos), "empty_chunks": len(ordered) - len(chunk_infos)})
    doc = {
        "format": FORMAT, "schema_version": SCHEMA_VERSION, "plan_fingerprint": plan.fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": {"dataset_dir": plan.dataset_dir, "layout": _layout_of(plan)},
        "config": cfg,
        "bands": bands, "bands_10m": stored[10], "bands_20m": stored[20], "bands_60m": stored[60],
        "cell_size_px": {"10m": CELL_SIZE_PX[10], "20m": CELL_SIZE_PX[20], "60m": CELL_SIZE_PX[60]},
        "normalisation": {"stored": "uint16 reflectance x 10000 at native resolution (lossless)",
                          "served": "float32 reflectance = value / 10000; 20 m bands bilinearly upsampled x2 "
                                    "(align_corners=False) to 10 m; order " + " ".join(stored[10] + stored[20]),
                          "scale": 10000},
        "cloud_classes": list(CLOUD_CLASSES),
        "patch_size": int(cfg["patch_size"]), "max_patch_nodata": float(cfg["max_patch_nodata"]),
        "compression": cfg["compression"],
        "num_cells": n_cells,
        "counts": counts,
        "stats": stats_from_histogram(hist, bands),
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
    atomic_write_json(out / MANIFEST_NAME, doc)
    return doc


def _layout_of(plan: Plan) -> str:
    for chunk in plan.chunks:
        for r in chunk:
            return r.layout
    return "unknown"


def _ranges(xs: Sequence[int]) -> str:
    out, xs = [], list(xs)
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


def convert(cfg: ConvertConfig) -> dict[str, Any]:
    """The local path: plan, convert every chunk with cfg.workers processes, merge. Returns the manifest."""
    if cfg.num_tasks != 1:
        raise ValueError("convert() runs everything in one go; for array tasks use convert_task() then merge()")
    plan = load_or_make_plan(cfg)
    convert_task(cfg, plan)
    return merge(cfg.out, nodes=cfg.nodes)


def verify_chunks(root: str | os.PathLike) -> list[str]:
    """Re-checksums every chunk listed in root/manifest.json (with the algorithm its checksum names); returns
    the paths whose checksum differs (empty: OK)."""
    from phileo.data.manifest import load_manifest

    m = load_manifest(root)
    return [c.path for c in m.chunks if not checksum_matches(m.chunk_path(c), c.checksum)]


# -------------------------------------------------------------------------------------------------------- CLI
def build_parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="majortom_to_h5.py",
        description="Convert MajorTOM Core-S2L2A / FastTOM (parquet shards or the unpacked tree, auto-detected) "
                    "into HDF5 chunk files and OUT/manifest.json for PhilEO pretraining. Locally: one command. "
                    "On SLURM: an array of tasks with --array (each converts a disjoint slice), then --merge.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", type=Path, help="folder holding Core-S2L2A/ (or FastTOM's folder), or that folder")
    p.add_argument("--out", type=Path, required=True, help="output folder (chunks/, manifest.json)")
    p.add_argument("--nodes", type=int, default=1, help="training nodes the manifest's assignment is made for "
                   "(any other count up to the number of chunks works at training time)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes; each decodes on two threads while it writes on a third (about two "
                        "cores' worth when free), so about half the cores is a good number")
    g = p.add_argument_group("input")
    g.add_argument("--layout", choices=["parquet", "tree"], default=None, help="force a layout (default: detect)")
    g.add_argument("--no-metadata", action="store_true",
                   help="list cells from the shards/tree themselves even when metadata.parquet is present")
    g.add_argument("--bands", default=",".join(PHILEO_BANDS),
                   help="comma-separated bands to store (B01 and B09 are 60 m and unused by PhilEO)")
    g.add_argument("--limit", type=int, default=None, help="convert only the first N cells (trial run)")
    g.add_argument("--sample", type=int, default=None, help="convert N cells drawn at random (trial run)")
    g.add_argument("--sample-seed", type=int, default=0)
    g = p.add_argument_group("thresholds")
    g.add_argument("--patch-size", type=int, default=128, help="training patch size the validity maps are for")
    g.add_argument("--max-patch-nodata", type=float, default=0.1,
                   help="patches with a larger no-data fraction are never served (PhilEO Bench's rule)")
    g.add_argument("--max-cell-nodata", type=float, default=1.0,
                   help="skip cells with a larger no-data fraction (cells without any servable patch are "
                        "always skipped)")
    g.add_argument("--max-cloud-cover", type=float, default=100.0,
                   help="skip cells with more thick+thin cloud (percent of valid pixels)")
    g = p.add_argument_group("output")
    g.add_argument("--cells-per-chunk", type=int, default=None,
                   help=f"cells per HDF5 file (default: {DEFAULT_CELLS_PER_CHUNK}, fewer when that would give "
                        f"less than {CHUNKS_PER_NODE_TARGET} chunks per node)")
    g.add_argument("--compression", choices=COMPRESSIONS, default="lz4",
                   help="lossless HDF5 filter (lz4/zstd: Blosc via hdf5plugin; readers need hdf5plugin)")
    g = p.add_argument_group("SLURM array / steps")
    g.add_argument("--array", action="store_true",
                   help="be one task of a job array, index from SLURM_ARRAY_TASK_ID; with --num-tasks N the id "
                        "is the index (so failed ids can be re-submitted alone), without it the array must be "
                        "one contiguous range and its size is N; writes a part manifest only")
    g.add_argument("--task-index", type=int, default=None, help="this task's index (0-based)")
    g.add_argument("--num-tasks", type=int, default=None, help="number of tasks the chunks are split among")
    g.add_argument("--merge", action="store_true", help="merge the finished tasks' parts into OUT/manifest.json")
    g.add_argument("--plan-only", action="store_true",
                   help="list and chunk the cells (OUT/plan.json), convert nothing: run once before a large "
                        "array so the tasks do not all list the source")
    g.add_argument("--verify", action="store_true", help="re-hash the chunks of OUT/manifest.json and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _array_env(environ: dict[str, str], num_tasks: int | None) -> tuple[int, int]:
    """(task_index, num_tasks) of this SLURM array task.

    With num_tasks given, the array task id is the task index itself, so a subset can be re-submitted
    (sbatch --array=17,40 … --array --num-tasks 64). Without it, the array must be one contiguous range
    (--array=0-63 or 1-64) and its size is the number of tasks.
    """
    try:
        task_id = int(environ["SLURM_ARRAY_TASK_ID"])
    except KeyError:
        raise ValueError("--array needs SLURM_ARRAY_TASK_ID (run it inside sbatch --array=0-N); outside SLURM "
                         "give --task-index and --num-tasks") from None
    if num_tasks is not None:
        if not 0 <= task_id < num_tasks:
            raise ValueError(f"SLURM_ARRAY_TASK_ID={task_id} is not a task index for --num-tasks {num_tasks}: "
                             f"submit with --array=0-{num_tasks - 1} (or a subset of those ids)")
        return task_id, num_tasks
    first = int(environ.get("SLURM_ARRAY_TASK_MIN", task_id))
    last = int(environ.get("SLURM_ARRAY_TASK_MAX", task_id))
    count = int(environ.get("SLURM_ARRAY_TASK_COUNT", last - first + 1))
    step = int(environ.get("SLURM_ARRAY_TASK_STEP", 1))
    if step != 1 or count != last - first + 1:
        raise ValueError(f"this array (ids {first}-{last}, {count} tasks) is not one contiguous range, so its "
                         f"size is not the number of tasks: add --num-tasks N (the total of the full array)")
    return task_id - first, count


def config_from_args(args, environ: dict[str, str] | None = None) -> ConvertConfig:
    """A ConvertConfig from parsed CLI arguments (and the SLURM array variables for --array)."""
    environ = dict(os.environ if environ is None else environ)
    task_index, num_tasks = args.task_index, args.num_tasks
    if args.array:
        if task_index is not None:
            raise ValueError("give either --array (index from SLURM) or --task-index, not both")
        task_index, num_tasks = _array_env(environ, num_tasks)
    elif (task_index is None) != (num_tasks is None):
        raise ValueError("--task-index and --num-tasks go together")
    bands = tuple(b.strip() for b in args.bands.split(",") if b.strip())
    return ConvertConfig(
        source=args.source, out=args.out, nodes=args.nodes, workers=args.workers, layout=args.layout,
        use_metadata=False if args.no_metadata else None, bands=bands, patch_size=args.patch_size,
        max_patch_nodata=args.max_patch_nodata, max_cell_nodata=args.max_cell_nodata,
        max_cloud_cover=args.max_cloud_cover, limit=args.limit, sample=args.sample, sample_seed=args.sample_seed,
        cells_per_chunk=args.cells_per_chunk, compression=args.compression,
        task_index=task_index or 0, num_tasks=num_tasks or 1, progress=not args.no_progress)


def _summary(doc: dict[str, Any]) -> str:
    c = doc["counts"]
    return (f"manifest: {doc['num_cells']} cells in {len(doc['chunks'])} chunks for "
            f"{doc['assignment']['num_nodes']} node(s); listed {c['listed']}, duplicates dropped "
            f"{c['duplicates']}, rejected {c['rejected']}, skipped {c['skipped']}")


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI of preprocess/majortom_to_h5.py; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.verify:
            bad = verify_chunks(args.out)
            print("all chunk checksums match" if not bad else f"checksum mismatch: {', '.join(bad)}")
            return 1 if bad else 0
        if args.merge:
            doc = merge(args.out, nodes=args.nodes)
            print(_summary(doc) + f" -> {args.out / MANIFEST_NAME}")
            return 0
        if args.source is None and not (args.out / PLAN_JSON).is_file():
            parser.error("--source is required (unless OUT already holds a plan)")
        cfg = config_from_args(args)
        plan = load_or_make_plan(cfg)
        if args.plan_only:
            print(f"plan: {plan.counts['planned']} cells in {len(plan.chunks)} chunks of up to "
                  f"{plan.cells_per_chunk} ({plan.counts['duplicates']} duplicates dropped) -> "
                  f"{cfg.out / PLAN_JSON}")
            return 0
        part = convert_task(cfg, plan)
        n = sum(e["n_cells"] for e in part["chunks"])
        print(f"task {cfg.task_index}/{cfg.num_tasks}: {len(part['chunks'])} chunk(s), {n} cells -> "
              f"{cfg.out / 'parts' / part_name(cfg.task_index, cfg.num_tasks)}")
        if cfg.num_tasks == 1:
            doc = merge(cfg.out, nodes=cfg.nodes)
            print(_summary(doc) + f" -> {cfg.out / MANIFEST_NAME}")
        return 0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
