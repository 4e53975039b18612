"""The conversion plan: which MajorTOM cells go into which chunk, decided once and read by every array task.

`ConvertConfig` holds everything that decides what the converter writes; `make_plan` lists the source's cells
(from metadata.parquet when present, else from the shards/tree themselves), drops duplicate
(grid_cell, product_id) rows (keeping the first in reading order), applies --limit/--sample, and cuts the cells
into chunks of --cells-per-chunk consecutive cells. No image is decoded. The plan is deterministic and stored
in OUT/plan.json + OUT/plan.parquet (see phileo.data.chunk_format), so every array task reads the same one;
`load_or_make_plan` refuses to resume a folder planned with other content arguments.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from phileo.data.chunk_format import COMPRESSIONS, PLAN_CELLS, PLAN_FORMAT, PLAN_JSON, SCHEMA_VERSION
from phileo.data.majortom import (ALL_BANDS, BAND_RESOLUTION_M, BANDS_60M, CELL_SIZE_PX, CellRef, MajorTOMSource,
                                  PHILEO_BANDS)
from phileo.fsutil import atomic_path, atomic_write_json, make_group_readable, read_json

DEFAULT_CELLS_PER_CHUNK = 256  # ~3.5 GB raw per chunk on real data: few files, still many more than nodes
CHUNKS_PER_NODE_TARGET = 8     # auto chunk size keeps at least this many chunks per node when cells allow


@dataclass
class ConvertConfig:
    """Everything that decides what the converter writes (plus how fast: workers, progress).

    Refused when built: unknown bands, a band listed twice, patch sizes that are not even or do not fit in a
    cell, fractions outside [0, 1], limit together with sample, impossible task indices, auxiliary rasters that
    do not open as single-band rasters with a CRS (phileo.data.aux_targets.AuxRaster).
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
    aux_buildings: Path | None = None        # global building-percent raster (GeoTIFF/VRT, any CRS)
    aux_landcover: Path | None = None        # global ESA WorldCover raster
    task_index: int = 0
    num_tasks: int = 1
    progress: bool = True

    def __post_init__(self):
        self.out = Path(self.out)
        self.source = Path(self.source) if self.source is not None else None
        self.bands = tuple(self.bands)
        self.aux_buildings = Path(self.aux_buildings) if self.aux_buildings is not None else None
        self.aux_landcover = Path(self.aux_landcover) if self.aux_landcover is not None else None
        self.aux_rasters()  # refuses an unreadable raster now, naming its flag, before any cell is listed
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

    def aux_rasters(self):
        """{target: phileo.data.aux_targets.AuxRaster} of the auxiliary rasters given (empty without)."""
        from phileo.data.aux_targets import open_aux_rasters

        return open_aux_rasters(self.aux_buildings, self.aux_landcover)

    def content_fingerprint(self) -> dict[str, Any]:
        """The arguments that decide what is written (not how fast or by which task). The auxiliary rasters
        appear only when given, so plans made without them keep their fingerprint."""
        aux = {f"aux_{k}": str(p.absolute()) for k, p in (("buildings", self.aux_buildings),
                                                           ("landcover", self.aux_landcover)) if p is not None}
        return {**aux, "source": str(self.source.absolute()) if self.source else None, "layout": self.layout,
                "use_metadata": self.use_metadata, "bands": list(self.bands), "patch_size": self.patch_size,
                "max_patch_nodata": self.max_patch_nodata, "max_cell_nodata": self.max_cell_nodata,
                "max_cloud_cover": self.max_cloud_cover, "limit": self.limit, "sample": self.sample,
                "sample_seed": self.sample_seed, "cells_per_chunk": self.cells_per_chunk,
                "compression": self.compression}


# The converter's flag of each content argument a resumed conversion must repeat (phileo.data.cli). source, the
# auxiliary rasters and cells_per_chunk are not here: given --out alone, the plan supplies them itself.
_CONTENT_FLAGS = {"layout": "--layout", "bands": "--bands", "patch_size": "--patch-size",
                  "max_patch_nodata": "--max-patch-nodata", "max_cell_nodata": "--max-cell-nodata",
                  "max_cloud_cover": "--max-cloud-cover", "limit": "--limit", "sample": "--sample",
                  "sample_seed": "--sample-seed", "compression": "--compression"}


def content_flags(config: dict[str, Any]) -> list[str]:
    """The converter flags that, with `--out OUT` and no --source, resume the conversion whose plan config
    (`Plan.config`, a manifest's `config`) is `config`: each content argument that differs from its default.
    A command with other values would be refused by load_or_make_plan."""
    defaults = {f.name: f.default for f in fields(ConvertConfig)}
    flags: list[str] = []
    if config.get("use_metadata") is False:
        flags.append("--no-metadata")
    for key, flag in _CONTENT_FLAGS.items():
        value, default = config.get(key, defaults[key]), defaults[key]
        if key == "bands":
            value, default = ",".join(value), ",".join(default)
        if value != default:
            flags += [flag, str(value)]
    return flags


# The columns of plan.parquet: one row per planned cell.
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


def write_plan(out: Path, plan: Plan) -> None:
    """Writes plan.parquet, then plan.json (atomically, in that order: plan.json means the plan is whole)."""
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
        "format": PLAN_FORMAT, "schema_version": SCHEMA_VERSION, "fingerprint": plan.fingerprint,
        "config": plan.config, "cells_per_chunk": plan.cells_per_chunk, "dataset_dir": plan.dataset_dir,
        "n_chunks": len(plan.chunks), "counts": plan.counts, "duplicates": plan.duplicates,
        "not_present_shards": plan.not_present_shards, "unreadable": plan.unreadable})


def read_plan(out: Path) -> Plan | None:
    """The plan stored in `out`, or None when there is none; refuses a plan.parquet that does not read."""
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
    existing = read_plan(cfg.out)
    if existing is not None:
        want = cfg.content_fingerprint()
        have = dict(existing.config)
        if want["cells_per_chunk"] is None:  # auto: whatever the plan resolved it to
            want["cells_per_chunk"] = have.get("cells_per_chunk")
        if cfg.source is None:  # resuming from OUT alone: the plan knows the source
            want["source"] = have.get("source")
            cfg.source = Path(have["source"]) if have.get("source") else None
            for key in ("aux_buildings", "aux_landcover"):  # and its auxiliary rasters
                if have.get(key) and getattr(cfg, key) is None:
                    want[key] = have[key]
                    setattr(cfg, key, Path(have[key]))
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if diff:
            details = ", ".join(f"{k}: {have.get(k)!r} there, {want.get(k)!r} now" for k in diff)
            raise ValueError(f"{cfg.out / PLAN_JSON} was made with other arguments ({details}). Re-run with the "
                             f"same arguments to resume, or convert into a new --out folder")
        return existing
    plan = make_plan(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    make_group_readable(cfg.out, directory=True)
    write_plan(cfg.out, plan)
    return plan


def task_chunks(n_chunks: int, task_index: int, num_tasks: int) -> range:
    """The contiguous range of chunk indices array task `task_index` of `num_tasks` converts."""
    return range(task_index * n_chunks // num_tasks, (task_index + 1) * n_chunks // num_tasks)

