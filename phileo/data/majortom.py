"""Readers for MajorTOM Core-S2L2A (and FastTOM, same format) in both published layouts.

Layout "parquet" (what a user has after downloading the dataset)::

    <dataset>/images/part_XXXXX.parquet     one cell per row group; columns product_id, grid_cell,
                                            product_datetime (strings), thumbnail (JPEG bytes),
                                            B01 … B12 and cloud_mask (each a complete single-band GeoTIFF)
    <dataset>/metadata.parquet              optional; one row per cell: grid_cell, product_id, timestamp,
                                            cloud_cover, nodata, centre_lat/lon, crs, parquet_url, parquet_row

Layout "tree" (what MajorTOM's download helper unpacks, and what PhilEO's loader read)::

    <dataset>/L2A/<row>/<grid_cell>/<product_id>/<BAND>.tif, cloud_mask.tif, thumbnail.png
    <dataset>/metadata.parquet              optional, as above

`<dataset>` is `Core-S2L2A` (or FastTOM's folder); `MajorTOMSource(root)` finds it at `root` or one level
below and detects the layout. Bands are uint16 reflectance ×10000; 10 m bands and the cloud mask are
1068 × 1068 px, 20 m bands 534 × 534, 60 m bands 178 × 178, all in the cell's UTM CRS with one origin.

`read_cell` returns the requested bands as arrays or raises `CellError` with the reason (missing band, bytes
that do not decode, wrong size, mismatched georeferencing); callers record the reason and carry on.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

# Band names by native resolution, and the parquet column order of the published shards.
BANDS_10M = ("B02", "B03", "B04", "B08")
BANDS_20M = ("B05", "B06", "B07", "B8A", "B11", "B12")
BANDS_60M = ("B01", "B09")
ALL_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
# PhilEO's channel order: 10 m bands, then 20 m bands (upsampled to 10 m when served).
PHILEO_BANDS = BANDS_10M + BANDS_20M
BAND_RESOLUTION_M = {**{b: 10 for b in BANDS_10M}, **{b: 20 for b in BANDS_20M}, **{b: 60 for b in BANDS_60M}}
CELL_SIZE_PX = {10: 1068, 20: 534, 60: 178}
CELL_SIZE_M = 10680  # every resolution covers the same 10.68 km square
CLOUD_MASK = "cloud_mask"
CLOUD_CLASSES = ("clear", "thick_cloud", "thin_cloud", "cloud_shadow")
LAYOUTS = ("parquet", "tree")
META_COLUMNS = ("grid_cell", "product_id", "product_datetime")

# Sibling-file probing (.aux.xml, .ovr) costs a metadata round trip per file on Lustre and finds nothing here.
_GDAL_ENV = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", "GDAL_NUM_THREADS": "1", "CPL_LOG_ERRORS": "OFF"}


class CellError(Exception):
    """A cell that cannot be used; `reason` says why in words a user can act on."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, order=True)
class CellRef:
    """Where one cell lives. Sorts in reading order (shard, row group) or (tree path).

    `path` is the shard file (parquet) or the cell's folder (tree); `row_group`/`row` locate it inside a shard.
    `timestamp` is filled from metadata.parquet when the listing came from it.
    """

    path: str
    row_group: int
    row: int
    grid_cell: str
    product_id: str
    layout: str = field(compare=False)
    timestamp: str | None = field(default=None, compare=False)

    @property
    def key(self) -> tuple[str, str]:
        """(grid_cell, product_id): a MajorTOM cell's identity (duplicates share it)."""
        return self.grid_cell, self.product_id

    def describe(self, dataset_dir: str | os.PathLike | None = None) -> str:
        """Short location for reports: 'images/part_00001.parquet#row_group=3' or 'L2A/454U/…/<product_id>'."""
        p = Path(self.path)
        if dataset_dir is not None:
            try:
                p = p.relative_to(dataset_dir)
            except ValueError:
                pass
        return f"{p}#row_group={self.row_group}" if self.layout == "parquet" else str(p)


@dataclass
class Cell:
    """One decoded cell: `bands` maps band name → uint16 array at native resolution; `transform` is the GDAL
    geotransform (x0, dx, rx, y0, ry, dy) of the 10 m grid in `crs` ('EPSG:<code>' or WKT)."""

    grid_cell: str
    product_id: str
    timestamp: str
    crs: str
    transform: tuple[float, float, float, float, float, float]
    bands: dict[str, np.ndarray]
    cloud_mask: np.ndarray | None


def normalise_timestamp(value) -> str:
    """ISO 8601 UTC ('2020-08-15T10:20:31Z') of a product_datetime/timestamp in any of the forms MajorTOM
    uses: datetime, pandas/pyarrow timestamp, '20200815T102031', '2020-08-15 10:20:31', ISO with zone."""
    if value is None:
        raise ValueError("no timestamp")
    if isinstance(value, _dt.datetime):
        dt = value if value.tzinfo is None else value.astimezone(_dt.timezone.utc).replace(tzinfo=None)
        return dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    s = str(value).strip()
    m = re.fullmatch(r"(\d{8})T(\d{6})(?:\.\d+)?Z?", s)
    if m:
        return _dt.datetime.strptime(m.group(1) + m.group(2), "%Y%m%d%H%M%S").strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        dt = _dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"unrecognised timestamp {value!r}") from None
    return normalise_timestamp(dt)


def timestamp_of_product_id(product_id: str) -> str:
    """Sensing time of a Sentinel-2 product id ('S2A_MSIL2A_20200815T102031_N0214_…' → '2020-08-15T10:20:31Z')."""
    m = re.search(r"_(\d{8}T\d{6})_", product_id)
    if not m:
        raise ValueError(f"no sensing time in product id {product_id!r}")
    return normalise_timestamp(m.group(1))


def _crs_string(crs) -> str:
    if crs is None:
        return ""
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_wkt()


def decode_geotiff(data: bytes | str | os.PathLike, what: str,
                   out: np.ndarray | None = None) -> tuple[np.ndarray, str, tuple[float, ...]]:
    """Decodes a single-band GeoTIFF (bytes or a file path) → (array, crs, geotransform).

    With `out` (a writable 2-D array) the pixels are decoded straight into it when shape and dtype match
    (saving a copy); otherwise a new array is returned. Raises CellError naming `what` when the bytes are
    absent or do not decode (e.g. a truncated download).
    """
    import rasterio
    from rasterio.io import MemoryFile

    def read(ds):
        if out is not None and out.shape == (ds.height, ds.width) and out.dtype == np.dtype(ds.dtypes[0]):
            return ds.read(1, out=out)
        return ds.read(1)

    try:
        with rasterio.Env(**_GDAL_ENV):
            if isinstance(data, (bytes, bytearray, memoryview)):
                if len(data) == 0:
                    raise CellError(f"{what} is empty (0 bytes)")
                with MemoryFile(bytes(data)) as mf, mf.open(driver="GTiff") as ds:
                    arr, crs, gt = read(ds), ds.crs, ds.transform.to_gdal()
            else:
                with rasterio.open(data, driver="GTiff") as ds:
                    arr, crs, gt = read(ds), ds.crs, ds.transform.to_gdal()
    except CellError:
        raise
    except Exception as e:  # GDAL reports truncation/corruption as several exception types
        msg = str(e).splitlines()[0] if str(e) else ""
        raise CellError(f"{what} does not decode ({type(e).__name__}: {msg[:200]})") from None
    return arr, _crs_string(crs), tuple(float(v) for v in gt)


def _check_band(name: str, arr: np.ndarray, crs: str, gt: Sequence[float], ref_crs: str,
                ref_gt: Sequence[float] | None, resolution_m: int) -> None:
    size = CELL_SIZE_PX[resolution_m]
    if arr.shape != (size, size):
        raise CellError(f"{name} is {arr.shape[0]}×{arr.shape[1]} px, expected {size}×{size} "
                        f"({resolution_m} m band of a MajorTOM cell)")
    if name != CLOUD_MASK and arr.dtype != np.uint16:
        raise CellError(f"{name} has dtype {arr.dtype}, expected uint16 reflectance ×10000")
    if crs != ref_crs:
        raise CellError(f"{name} is in CRS {crs or '(none)'} but the cell's 10 m bands are in {ref_crs}")
    if ref_gt is not None:
        x0, dx, rx, y0, ry, dy = gt
        rx0, rdx, _, ry0, _, rdy = ref_gt
        scale = resolution_m / 10
        if (abs(x0 - rx0) > 1e-3 or abs(y0 - ry0) > 1e-3 or abs(dx - rdx * scale) > 1e-6
                or abs(dy - rdy * scale) > 1e-6 or rx != 0 or ry != 0):
            raise CellError(f"{name}'s geotransform {tuple(gt)} does not match the 10 m grid {tuple(ref_gt)} "
                            f"at {resolution_m} m")


def _find_dataset_dir(root: Path, layout: str | None) -> tuple[Path, str]:
    def layouts_in(d: Path) -> list[str]:
        found = []
        if (d / "images").is_dir() and any((d / "images").glob("*.parquet")):
            found.append("parquet")
        if (d / "L2A").is_dir():
            found.append("tree")
        return found

    if not root.is_dir():
        raise FileNotFoundError(f"MajorTOM source folder not found: {root}")
    candidates = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    if root.name == "images" and any(root.glob("*.parquet")):
        candidates.insert(0, root.parent)
    for d in candidates:
        found = layouts_in(d)
        if layout is not None and layout in found:
            return d, layout
        if layout is None and found:
            return d, found[0]  # parquet wins when both are present: it is the published form
    want = {"parquet": "images/part_*.parquet", "tree": "L2A/<row>/<grid_cell>/<product_id>/B02.tif"}
    shown = " or ".join(f"{root}/Core-S2L2A/{want[k]}" for k in ([layout] if layout else LAYOUTS))
    raise FileNotFoundError(
        f"no MajorTOM data found under {root}: expected {shown}. Point --source at the folder that holds "
        f"Core-S2L2A (or FastTOM's folder), or at that folder itself")


class MajorTOMSource:
    """A MajorTOM Core-S2L2A/FastTOM download on local storage, in either layout (auto-detected).

    Takes the folder holding `Core-S2L2A/` (or that folder itself, or its `images/`), `layout` to force
    "parquet" or "tree", and `use_metadata` (None: use metadata.parquet when present). Refuses a folder with
    neither layout, naming the paths it looked for. Parquet shards are opened lazily and a few kept open.
    """

    def __init__(self, root: str | os.PathLike, layout: str | None = None, use_metadata: bool | None = None):
        if layout is not None and layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        # Absolute (not resolved: symlinked scratch paths stay as the user wrote them), so a plan made in one
        # working directory is valid for array tasks started from another.
        self.root = Path(root).absolute()
        self.dataset_dir, self.layout = _find_dataset_dir(self.root, layout)
        self.metadata_path = self.dataset_dir / "metadata.parquet"
        if use_metadata and not self.metadata_path.is_file():
            raise FileNotFoundError(f"metadata requested but {self.metadata_path} does not exist; "
                                    f"drop the request to list cells from the data itself")
        self.use_metadata = self.metadata_path.is_file() if use_metadata is None else use_metadata
        self._shards: OrderedDict[str, object] = OrderedDict()
        # Cells the metadata lists in shards/folders that are not on disk (a partial download): counted, not
        # rejected one by one, since a subset download is normal.
        self.not_present: list[str] = []
        self.not_present_cells = 0
        # Shards that do not open (e.g. a download cut short): reported like rejected cells, never fatal.
        self.unreadable: list[dict[str, str | None]] = []

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_shards"] = OrderedDict()  # pyarrow file handles stay in the process that opened them
        return state

    def __repr__(self) -> str:
        return f"MajorTOMSource({str(self.dataset_dir)!r}, layout={self.layout!r}, metadata={self.use_metadata})"

    # ---------------------------------------------------------------------------------------------- listing
    def list_cells(self) -> list[CellRef]:
        """All cells present, in reading order, duplicates included (deduplication is the caller's policy)."""
        if self.layout == "parquet":
            refs = self._list_parquet_metadata() if self.use_metadata else self._list_parquet_scan()
        else:
            refs = self._list_tree_metadata() if self.use_metadata else self._list_tree_scan()
        return sorted(refs)

    def shard_paths(self) -> list[Path]:
        return sorted((self.dataset_dir / "images").glob("*.parquet"))

    def _row_locator(self, pf) -> list[tuple[int, int]]:
        """(row_group, row in group) of every row of a shard."""
        loc = []
        for rg in range(pf.metadata.num_row_groups):
            loc.extend((rg, r) for r in range(pf.metadata.row_group(rg).num_rows))
        return loc

    def _open_for_listing(self, shard: Path, cells=lambda: [(None, None)]):
        """The shard's ParquetFile, or None after recording why it cannot be read (for each cell that
        `cells()` lists in it; computed only on failure)."""
        try:
            pf = self._shard(shard)
            missing = [c for c in ("grid_cell", "product_id") if c not in pf.schema_arrow.names]
            if missing:
                raise ValueError(f"lacks column(s) {missing}: not a MajorTOM Core-S2L2A shard")
            return pf
        except Exception as e:
            reason = f"shard {shard.name} does not open ({type(e).__name__}: {str(e)[:200]}); re-download it"
            for gc, pid in cells():
                self.unreadable.append({"grid_cell": gc, "product_id": pid,
                                        "source": str(shard.relative_to(self.dataset_dir)), "reason": reason})
            return None

    def _list_parquet_scan(self) -> list[CellRef]:
        refs = []
        for shard in self.shard_paths():
            pf = self._open_for_listing(shard)
            if pf is None:
                continue
            t = pf.read(columns=["grid_cell", "product_id"])
            loc = self._row_locator(pf)
            for (rg, r), gc, pid in zip(loc, t.column("grid_cell").to_pylist(), t.column("product_id").to_pylist()):
                refs.append(CellRef(str(shard), rg, r, str(gc), str(pid), "parquet"))
        return refs

    def _read_metadata(self, columns: Iterable[str]) -> dict[str, list]:
        import pyarrow.parquet as pq

        names = pq.ParquetFile(self.metadata_path).schema_arrow.names
        missing = [c for c in columns if c not in names]
        if missing:
            raise ValueError(f"{self.metadata_path} lacks column(s) {missing}; re-download it, or run without "
                             f"metadata (--no-metadata) to list cells from the data itself")
        t = pq.read_table(self.metadata_path, columns=list(columns))
        return {c: t.column(c).to_pylist() for c in columns}

    def _list_parquet_metadata(self) -> list[CellRef]:
        meta = self._read_metadata(["grid_cell", "product_id", "timestamp", "parquet_url", "parquet_row"])
        present = {p.name: p for p in self.shard_paths()}
        locators: dict[str, list[tuple[int, int]] | None] = {}
        rows = list(zip(meta["grid_cell"], meta["product_id"], meta["timestamp"], meta["parquet_url"],
                        meta["parquet_row"]))
        shard_of = [str(url).rstrip("/").rsplit("/", 1)[-1] for _, _, _, url, _ in rows]
        refs, absent = [], set()
        for (gc, pid, ts, url, row), name in zip(rows, shard_of):
            if name not in present:
                absent.add(name)
                self.not_present_cells += 1
                continue
            if name not in locators:
                pf = self._open_for_listing(present[name], lambda name=name: [
                    (str(r[0]), str(r[1])) for r, n in zip(rows, shard_of) if n == name])
                locators[name] = self._row_locator(pf) if pf is not None else None
            loc = locators[name]
            if loc is None:
                continue
            if not 0 <= int(row) < len(loc):
                raise ValueError(f"{self.metadata_path} places {gc}/{pid} at row {row} of {name}, which has "
                                 f"{len(loc)} rows: the metadata does not belong to these shards; run with "
                                 f"--no-metadata")
            rg, r = loc[int(row)]
            refs.append(CellRef(str(present[name]), rg, r, str(gc), str(pid), "parquet",
                                _ts_or_none(ts)))
        self.not_present = sorted(absent)
        return refs

    def _cell_dir(self, grid_cell: str, product_id: str) -> Path:
        return self.dataset_dir / "L2A" / grid_cell.split("_", 1)[0] / grid_cell / product_id

    def _list_tree_scan(self) -> list[CellRef]:
        refs = []
        l2a = self.dataset_dir / "L2A"
        for row_dir in sorted(p for p in l2a.iterdir() if p.is_dir()):
            for cell_dir in sorted(p for p in row_dir.iterdir() if p.is_dir()):
                for prod_dir in sorted(p for p in cell_dir.iterdir() if p.is_dir()):
                    refs.append(CellRef(str(prod_dir), -1, 0, cell_dir.name, prod_dir.name, "tree"))
        return refs

    def _list_tree_metadata(self) -> list[CellRef]:
        meta = self._read_metadata(["grid_cell", "product_id", "timestamp"])
        refs = []
        for gc, pid, ts in zip(meta["grid_cell"], meta["product_id"], meta["timestamp"]):
            d = self._cell_dir(str(gc), str(pid))
            if not d.is_dir():
                self.not_present_cells += 1
                continue
            refs.append(CellRef(str(d), -1, 0, str(gc), str(pid), "tree", _ts_or_none(ts)))
        return refs

    # ---------------------------------------------------------------------------------------------- reading
    def _shard(self, path: str | Path):
        import pyarrow.parquet as pq

        key = str(path)
        pf = self._shards.get(key)
        if pf is None:
            pf = pq.ParquetFile(key, memory_map=False)
            self._shards[key] = pf
            while len(self._shards) > 4:
                self._shards.popitem(last=False)
        else:
            self._shards.move_to_end(key)
        return pf

    def read_cell(self, ref: CellRef, bands: Sequence[str] = PHILEO_BANDS, cloud_mask: bool = True,
                  out: dict[str, np.ndarray] | None = None) -> Cell:
        """Decodes `bands` (and the cloud mask) of one cell and checks sizes and georeferencing.

        `out` may map band names to preallocated arrays of the native size to decode into (the converter
        passes views of one (bands, H, W) block, so no stacking copy is needed).
        Raises CellError for a missing band, bytes that do not decode, a wrong size or dtype, bands whose CRS or
        origin disagree, or (parquet) a row that does not hold the cell the listing said it does.
        """
        unknown = [b for b in bands if b not in BAND_RESOLUTION_M]
        if unknown:
            raise ValueError(f"unknown band(s) {unknown}; MajorTOM S2L2A bands are {ALL_BANDS}")
        wanted = list(bands) + ([CLOUD_MASK] if cloud_mask else [])
        if ref.layout == "parquet":
            raw, timestamp = self._raw_parquet(ref, wanted)
        else:
            raw = {b: Path(ref.path) / f"{b}.tif" for b in wanted}
            missing = [b for b, p in raw.items() if not p.is_file()]
            if missing:
                raise CellError(f"band file(s) missing: {', '.join(missing)} in {ref.path}")
            try:
                timestamp = ref.timestamp or timestamp_of_product_id(ref.product_id)
            except ValueError as e:
                raise CellError(f"no timestamp for the cell: {e}") from None

        # The 10 m grid is the reference: take it from the first 10 m band asked for (or the mask).
        order = sorted(wanted, key=lambda b: 10 if b == CLOUD_MASK else BAND_RESOLUTION_M[b])
        arrays: dict[str, np.ndarray] = {}
        ref_crs, ref_gt = None, None
        for b in order:
            arr, crs, gt = decode_geotiff(raw[b], f"band {b}" if b != CLOUD_MASK else "cloud_mask",
                                          out=(out or {}).get(b))
            res = 10 if b == CLOUD_MASK else BAND_RESOLUTION_M[b]
            if ref_crs is None:
                if res != 10:
                    raise ValueError("read_cell needs at least one 10 m band or the cloud mask")
                ref_crs = crs
                if not crs:
                    raise CellError(f"{b} has no CRS: not a georeferenced MajorTOM band")
            if ref_gt is None:
                _check_band(b, arr, crs, gt, ref_crs, None, res)
                ref_gt = gt
            else:
                _check_band(b, arr, crs, gt, ref_crs, ref_gt, res)
            arrays[b] = arr
        mask = arrays.pop(CLOUD_MASK, None)
        if mask is not None:
            mask = mask.astype(np.uint8, copy=False)
        return Cell(ref.grid_cell, ref.product_id, timestamp, ref_crs, tuple(ref_gt), arrays, mask)

    def _raw_parquet(self, ref: CellRef, wanted: list[str]) -> tuple[dict[str, bytes], str]:
        pf = self._shard(ref.path)
        names = pf.schema_arrow.names
        absent = [b for b in wanted if b not in names]
        if absent:
            raise CellError(f"column(s) {', '.join(absent)} absent from shard {Path(ref.path).name}")
        cols = [c for c in META_COLUMNS if c in names] + wanted
        try:
            t = pf.read_row_group(ref.row_group, columns=cols)
        except Exception as e:
            raise CellError(f"row group {ref.row_group} of {Path(ref.path).name} does not read "
                            f"({type(e).__name__}: {e})") from None
        row = {c: t.column(c)[ref.row].as_py() for c in cols}
        if (str(row["grid_cell"]), str(row["product_id"])) != ref.key:
            raise CellError(f"row group {ref.row_group} of {Path(ref.path).name} holds "
                            f"{row['grid_cell']}/{row['product_id']}, not {ref.grid_cell}/{ref.product_id} "
                            f"as listed (stale metadata.parquet?)")
        missing = [b for b in wanted if row[b] is None]
        if missing:
            raise CellError(f"band(s) missing (null): {', '.join(missing)}")
        ts = ref.timestamp
        if ts is None:
            try:
                ts = normalise_timestamp(row.get("product_datetime"))
            except ValueError:
                try:
                    ts = timestamp_of_product_id(ref.product_id)
                except ValueError as e:
                    raise CellError(f"no timestamp for the cell: {e}") from None
        return {b: row[b] for b in wanted}, ts

    def close(self) -> None:
        self._shards.clear()


def _ts_or_none(value) -> str | None:
    try:
        return normalise_timestamp(value)
    except ValueError:
        return None


def unpack_parquet_to_tree(source: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Unpacks parquet shards into the tree layout, as MajorTOM's download helper does: every row's bands
    become `dest/Core-S2L2A/L2A/<row>/<grid_cell>/<product_id>/<BAND>.tif` (+ cloud_mask.tif, thumbnail.png);
    null columns are left out; metadata.parquet is copied. Returns the new dataset folder."""
    import shutil

    src = MajorTOMSource(source, layout="parquet", use_metadata=False)
    out = Path(dest) / src.dataset_dir.name
    for shard in src.shard_paths():
        pf = src._shard(shard)
        for rg in range(pf.metadata.num_row_groups):
            for row in pf.read_row_group(rg).to_pylist():
                d = out / "L2A" / row["grid_cell"].split("_", 1)[0] / row["grid_cell"] / row["product_id"]
                d.mkdir(parents=True, exist_ok=True)
                for name, data in row.items():
                    if name in META_COLUMNS or data is None:
                        continue
                    (d / ("thumbnail.png" if name == "thumbnail" else f"{name}.tif")).write_bytes(data)
    if src.metadata_path.is_file():
        shutil.copyfile(src.metadata_path, out / "metadata.parquet")
    return out
