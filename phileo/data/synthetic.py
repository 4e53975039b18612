"""Synthetic MajorTOM Core-S2L2A cells, written in exactly the published layouts, for tests, benchmarks and demos.

Each cell is a deterministic function of (seed, index): a MajorTOM grid cell name, a Sentinel-2 product id and
sensing time, the cell's real UTM CRS and a geotransform on the 60 m-aligned Sentinel-2 grid, 12 bands at their
native 1068/534/178 px as uint16 reflectance ×10000 GeoTIFFs, a 10 m cloud mask (0 clear, 1 thick, 2 thin,
3 shadow) and an RGB JPEG thumbnail. The imagery is a smooth mixture of vegetation, soil and water spectra
(multi-scale fields, so a reconstruction loss can fall) with clouds that brighten it where the mask says so
and shadows that darken it; some cells have a swath edge of no-data (0) over part of the image.

Faults can be injected as in real downloads: duplicate rows, truncated band bytes, a missing band, a band of
the wrong size (see `write_majortom_parquet`).
"""

from __future__ import annotations

import datetime as _dt
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from phileo.data import geo
from phileo.data.majortom import ALL_BANDS, BAND_RESOLUTION_M, BANDS_10M, BANDS_20M, CELL_SIZE_PX, CLOUD_MASK

HF_URL = "https://huggingface.co/datasets/Major-TOM/Core-S2L2A/resolve/main/images/"

# Endmember spectra (reflectance ×10000) in ALL_BANDS order: B01 B02 B03 B04 B05 B06 B07 B08 B8A B09 B11 B12.
_SPECTRA = np.array([
    [300, 400, 700, 400, 900, 2500, 3000, 3500, 3300, 1200, 1800, 900],       # vegetation
    [1000, 1200, 1500, 1800, 2000, 2300, 2500, 2500, 2700, 900, 3200, 2800],  # bare soil
    [700, 600, 500, 300, 250, 200, 180, 150, 160, 60, 80, 50],                # water
], dtype=np.float32)
_CLOUD_SPECTRUM = np.array([6000, 6500, 6600, 6700, 6800, 6900, 7000, 7000, 7100, 3000, 4500, 3500], np.float32)
_LAT_BANDS = "CDEFGHJKLMNPQRSTUVWX"
_TILE_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"


@dataclass(frozen=True)
class CellSpec:
    """Identity and georeferencing of synthetic cell `index`: enough to find it again in a test."""

    index: int
    grid_cell: str
    product_id: str
    sensing_time: _dt.datetime
    centre_lat: float
    centre_lon: float
    epsg: int
    geotransform: tuple[float, float, float, float, float, float]  # 10 m grid, GDAL order
    nodata_fraction_target: float


def cell_spec(index: int, seed: int = 0, nodata_every: int = 3) -> CellSpec:
    """The identity of synthetic cell `index` (every `nodata_every`-th cell, from index 1, has a no-data edge)."""
    rng = np.random.default_rng([seed, index, 1])
    spacing_lat = geo.GRID_SPACING_KM / geo._KM_PER_DEG_LAT
    row = int(rng.integers(round(-56 / spacing_lat), round(72 / spacing_lat)))
    lat_row = row * spacing_lat
    col_span = int(179 / (geo.GRID_SPACING_KM / (geo._KM_PER_DEG_LAT * math.cos(math.radians(lat_row)))))
    col = int(rng.integers(-col_span, col_span))
    grid_cell = geo.grid_cell_name(row, col)
    lat, lon = geo.grid_cell_centre(grid_cell)
    zone = geo.utm_zone_of_lon(lon)
    north = lat >= 0
    epsg = geo.epsg_of_utm(zone, north)
    e, n = geo.latlon_to_utm(lat, lon, zone)
    # Sentinel-2 tiles start on a 60 m multiple, so the 10, 20 and 60 m grids of a cell share one origin.
    half = CELL_SIZE_PX[10] * 10 / 2
    x0 = math.floor((float(e) - half) / 60) * 60.0
    y0 = math.ceil((float(n) + half) / 60) * 60.0
    t0 = _dt.datetime(2017, 1, 1, 9)
    sensing = t0 + _dt.timedelta(days=int(rng.integers(0, 7 * 365)), seconds=int(rng.integers(0, 3 * 3600)))
    processed = sensing + _dt.timedelta(seconds=int(rng.integers(3600, 6 * 3600)))
    lat_band = _LAT_BANDS[min(max(int((lat + 80) // 8), 0), len(_LAT_BANDS) - 1)]
    tile = f"T{zone:02d}{lat_band}{_TILE_LETTERS[int(rng.integers(24))]}{_TILE_LETTERS[int(rng.integers(24))]}"
    product_id = (f"S2{'AB'[int(rng.integers(2))]}_MSIL2A_{sensing:%Y%m%dT%H%M%S}_N0{int(rng.integers(200, 510))}"
                  f"_R{int(rng.integers(1, 144)):03d}_{tile}_{processed:%Y%m%dT%H%M%S}")
    nodata = float(rng.uniform(0.05, 0.5)) if nodata_every and index % nodata_every == 1 else 0.0
    return CellSpec(index, grid_cell, product_id, sensing, lat, lon, epsg, (x0, 10.0, 0.0, y0, 0.0, -10.0), nodata)


def _smooth_field(rng: np.random.Generator, size: int, knots: int) -> np.ndarray:
    """A smooth random field in roughly [-1, 1]: `knots`² random values spread by Gaussian kernels (two matmuls)."""
    centres = (np.arange(knots) + 0.5) / knots
    x = (np.arange(size) + 0.5) / size
    w = np.exp(-(((x[:, None] - centres[None, :]) * knots / 1.2) ** 2)).astype(np.float32)
    w /= w.sum(axis=1, keepdims=True)
    low = rng.standard_normal((knots, knots)).astype(np.float32)
    return w @ low @ w.T * 1.5


def _multiscale(rng: np.random.Generator, size: int) -> np.ndarray:
    return _smooth_field(rng, size, 5) + 0.45 * _smooth_field(rng, size, 18) + 0.2 * _smooth_field(rng, size, 70)


def _block_mean(a: np.ndarray, k: int) -> np.ndarray:
    """Mean over k × k blocks of the last two axes (strided sums: several times faster than reshape().mean())."""
    if k == 1:
        return a
    acc = np.zeros(a.shape[:-2] + (a.shape[-2] // k, a.shape[-1] // k), np.float32)
    for di in range(k):
        for dj in range(k):
            acc += a[..., di::k, dj::k]
    return acc / np.float32(k * k)


def synthetic_cell(spec: CellSpec, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray, bytes]:
    """Generates the imagery of one cell: ({band: uint16 array at native size}, cloud mask uint8, JPEG thumbnail)."""
    rng = np.random.default_rng([seed, spec.index, 2])
    size = CELL_SIZE_PX[10]
    # Land cover: soft abundances of three endmembers from multi-scale smooth fields.
    logits = np.stack([_multiscale(rng, size) for _ in range(3)]) * np.float32(2.5)
    logits[2] -= 1.5  # less water than land
    abund = np.exp(logits - logits.max(axis=0), dtype=np.float32)
    abund /= abund.sum(axis=0)
    # Clouds: a smooth field thresholded at a per-cell level; about a third of the cells are clear.
    cloud_field = _smooth_field(rng, size, 6) + 0.3 * _smooth_field(rng, size, 24)
    level = float(rng.uniform(0.2, 1.6)) if rng.random() > 0.3 else 99.0
    thick = cloud_field > level + 0.35
    thin = (cloud_field > level) & ~thick
    dy, dx = int(rng.integers(15, 45)), int(rng.integers(-45, 45))
    shadow = np.zeros_like(thick)
    src = thick[max(0, -dy):size - max(0, dy), max(0, -dx):size - max(0, dx)]
    shadow[max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
    shadow &= ~(thick | thin)
    mask = np.zeros((size, size), np.uint8)
    mask[thick], mask[thin], mask[shadow] = 1, 2, 3
    # Clouds brighten and shadows darken every band, so the mask is visible in the imagery.
    w_cloud = thick * np.float32(0.85) + thin * np.float32(0.4)
    w_shadow = shadow * np.float32(0.45)

    # Swath edge: everything beyond a straight line is no-data (0) in every band and in the mask.
    def nodata_at(res: int) -> np.ndarray | None:
        if spec.nodata_fraction_target <= 0:
            return None
        n = CELL_SIZE_PX[res]
        c = (np.arange(n) + 0.5) * res / 10
        proj = np.cos(theta) * c[None, :] + np.sin(theta) * c[:, None]
        return proj > cut

    if spec.nodata_fraction_target > 0:
        theta = float(rng.uniform(0, 2 * np.pi))
        c = np.arange(size) + 0.5
        proj10 = np.cos(theta) * c[None, :] + np.sin(theta) * c[:, None]
        cut = float(np.quantile(proj10[::4, ::4], 1 - spec.nodata_fraction_target))  # a sample is plenty
    bands: dict[str, np.ndarray] = {}
    for res in (10, 20, 60):
        k = res // 10
        a, wc, ws = _block_mean(abund, k), _block_mean(w_cloud, k), _block_mean(w_shadow, k)
        nd = nodata_at(res)
        for b in ALL_BANDS:
            if BAND_RESOLUTION_M[b] != res:
                continue
            i = ALL_BANDS.index(b)
            img = np.tensordot(_SPECTRA[:, i], a, axes=1)
            img = img * (1 - wc) + _CLOUD_SPECTRUM[i] * wc
            img *= 1 - ws
            img += rng.standard_normal(img.shape, dtype=np.float32) * (0.01 * img + 8)  # sensor noise
            out = np.clip(np.rint(img), 1, 65535).astype(np.uint16)
            if nd is not None:
                out[nd] = 0
            bands[b] = out
    nd10 = nodata_at(10)
    if nd10 is not None:
        mask[nd10] = 0
    rgb = np.stack([bands["B04"], bands["B03"], bands["B02"]], axis=-1)[::4, ::4]
    rgb = np.clip(rgb.astype(np.float32) / 3000 * 255, 0, 255).astype(np.uint8)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=80)
    return bands, mask, buf.getvalue()


def encode_geotiff(arr: np.ndarray, epsg: int, geotransform: Sequence[float], compress: str = "deflate") -> bytes:
    """A complete single-band GeoTIFF (bytes) of `arr` with its CRS and geotransform.

    `compress`: 'deflate' (as the published files; level 1 here for speed), 'zstd', 'lzw' or 'none'.
    """
    from rasterio.io import MemoryFile
    from rasterio.transform import Affine

    profile = dict(driver="GTiff", width=arr.shape[1], height=arr.shape[0], count=1, dtype=arr.dtype.name,
                   crs=f"EPSG:{epsg}", transform=Affine.from_gdal(*geotransform))
    if compress == "deflate":
        profile.update(compress="deflate", zlevel=1)
    elif compress == "zstd":
        profile.update(compress="zstd", zstd_level=1)
    elif compress == "lzw":
        profile.update(compress="lzw")
    elif compress != "none":
        raise ValueError(f"compress must be deflate, zstd, lzw or none, got {compress!r}")
    with MemoryFile() as mf:
        with mf.open(**profile) as ds:
            ds.write(arr, 1)
        return mf.read()


@dataclass(frozen=True)
class Faults:
    """Which synthetic cells carry which download fault (cell indices).

    duplicates: cells written a second time (same grid_cell and product_id, identical bytes);
    truncated: cells whose B04 bytes are cut in half (do not decode);
    missing_band: cells without B8A (a null in the shard, an absent file in the tree);
    wrong_size: cells whose B11 is 533 × 534 px instead of 534 × 534.
    """

    duplicates: tuple[int, ...] = ()
    truncated: tuple[int, ...] = ()
    missing_band: tuple[int, ...] = ()
    wrong_size: tuple[int, ...] = ()

    TRUNCATED_BAND = "B04"
    MISSING_BAND = "B8A"
    WRONG_SIZE_BAND = "B11"


def _faults(duplicates, truncated, missing_band, wrong_size) -> Faults:
    def idx(v) -> tuple[int, ...]:
        return tuple(int(i) for i in (v or ()))
    return Faults(idx(duplicates), idx(truncated), idx(missing_band), idx(wrong_size))


def _encoded_cell(spec: CellSpec, seed: int, faults: Faults,
                  compress: str) -> tuple[dict[str, bytes | None], float, float]:
    """(column name → bytes for one cell (None: band missing) with faults applied, cloud cover %, no-data
    fraction) as metadata.parquet reports them."""
    bands, mask, thumb = synthetic_cell(spec, seed)
    cloud_cover = float(np.mean((mask == 1) | (mask == 2)) * 100)
    nodata = float(np.mean(bands["B02"] == 0))
    x0, _, _, y0, _, _ = spec.geotransform
    out: dict[str, bytes | None] = {"thumbnail": thumb}
    for b in ALL_BANDS:
        res = BAND_RESOLUTION_M[b]
        arr = bands[b]
        if b == Faults.WRONG_SIZE_BAND and spec.index in faults.wrong_size:
            arr = arr[:-1, :]
        if b == Faults.MISSING_BAND and spec.index in faults.missing_band:
            out[b] = None
            continue
        data = encode_geotiff(arr, spec.epsg, (x0, float(res), 0.0, y0, 0.0, -float(res)), compress)
        if b == Faults.TRUNCATED_BAND and spec.index in faults.truncated:
            data = data[: len(data) // 2]
        out[b] = data
    out[CLOUD_MASK] = encode_geotiff(mask, spec.epsg, spec.geotransform, compress)
    return out, cloud_cover, nodata


def _metadata_row(spec: CellSpec, shard_name: str, row: int, cloud_cover: float, nodata: float) -> dict:
    row_u, col_r = geo.parse_grid_cell(spec.grid_cell)
    return dict(grid_cell=spec.grid_cell, grid_row_u=row_u, grid_col_r=col_r, product_id=spec.product_id,
                timestamp=spec.sensing_time, cloud_cover=cloud_cover, nodata=nodata,
                centre_lat=spec.centre_lat, centre_lon=spec.centre_lon, crs=f"EPSG:{spec.epsg}",
                parquet_url=HF_URL + shard_name, parquet_row=row)


def _write_metadata(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from phileo.fsutil import atomic_path

    schema = pa.schema([("grid_cell", pa.string()), ("grid_row_u", pa.int32()), ("grid_col_r", pa.int32()),
                        ("product_id", pa.string()), ("timestamp", pa.timestamp("s")),
                        ("cloud_cover", pa.float64()), ("nodata", pa.float64()), ("centre_lat", pa.float64()),
                        ("centre_lon", pa.float64()), ("crs", pa.string()), ("parquet_url", pa.string()),
                        ("parquet_row", pa.int64())])
    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(path, fsync=False) as tmp:
        pq.write_table(table, tmp)


def write_majortom_parquet(root: str | os.PathLike, n_cells: int, seed: int = 0, *, cells_per_shard: int = 4,
                           duplicates: Iterable[int] = (), truncated: Iterable[int] = (),
                           missing_band: Iterable[int] = (), wrong_size: Iterable[int] = (),
                           metadata: bool = True, compress: str = "deflate", nodata_every: int = 3,
                           first_index: int = 0) -> Path:
    """Writes `n_cells` synthetic cells as `root/Core-S2L2A/images/part_00001.parquet …` (one cell per row group,
    `cells_per_shard` per shard, published column order) plus `root/Core-S2L2A/metadata.parquet`.

    Fault injection (cell indices): `duplicates` are written again as extra rows at the end of the last shard and
    listed twice in the metadata; `truncated` cut B04's bytes in half; `missing_band` store B8A as null;
    `wrong_size` give B11 533 × 534 px. Returns the dataset folder `root/Core-S2L2A`.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from phileo.fsutil import atomic_path

    if n_cells < 1 or cells_per_shard < 1:
        raise ValueError("n_cells and cells_per_shard must be >= 1")
    faults = _faults(duplicates, truncated, missing_band, wrong_size)
    out = Path(root) / "Core-S2L2A"
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("product_id", pa.string()), ("grid_cell", pa.string()), ("product_datetime", pa.string()),
                        ("thumbnail", pa.binary())] + [(b, pa.binary()) for b in ALL_BANDS]
                       + [(CLOUD_MASK, pa.binary())])
    indices = list(range(first_index, first_index + n_cells))
    shards = [indices[i:i + cells_per_shard] for i in range(0, n_cells, cells_per_shard)]
    shards[-1] = shards[-1] + [i for i in faults.duplicates]  # duplicates land at the end of the last shard
    meta_rows = []
    for s, cells in enumerate(shards):
        name = f"part_{s + 1:05d}.parquet"
        with atomic_path(images / name, fsync=False) as tmp:
            with pq.ParquetWriter(tmp, schema, compression="none") as w:
                for r, i in enumerate(cells):
                    spec = cell_spec(i, seed, nodata_every)
                    cols, cloud_cover, nodata = _encoded_cell(spec, seed, faults, compress)
                    rec = {"product_id": spec.product_id, "grid_cell": spec.grid_cell,
                           "product_datetime": f"{spec.sensing_time:%Y%m%dT%H%M%S}", **cols}
                    w.write_table(pa.Table.from_pylist([rec], schema=schema))  # one row group per cell
                    meta_rows.append(_metadata_row(spec, name, r, cloud_cover, nodata))
    if metadata:
        _write_metadata(out / "metadata.parquet", meta_rows)
    return out


def write_majortom_tree(root: str | os.PathLike, n_cells: int, seed: int = 0, *,
                        duplicates: Iterable[int] = (), truncated: Iterable[int] = (),
                        missing_band: Iterable[int] = (), wrong_size: Iterable[int] = (),
                        metadata: bool = True, compress: str = "deflate", nodata_every: int = 3,
                        first_index: int = 0) -> Path:
    """Writes `n_cells` synthetic cells as the unpacked tree
    `root/Core-S2L2A/L2A/<row>/<grid_cell>/<product_id>/<BAND>.tif` (+ cloud_mask.tif, thumbnail.png holding
    the JPEG bytes, as the download helper writes them) and `root/Core-S2L2A/metadata.parquet`.

    Same cells (and bytes) as `write_majortom_parquet` with the same seed. Faults as there; `duplicates` can only
    show in the metadata (a folder cannot exist twice), so they are listed twice there. Returns `root/Core-S2L2A`.
    """
    faults = _faults(duplicates, truncated, missing_band, wrong_size)
    out = Path(root) / "Core-S2L2A"
    meta_rows = []
    for r, i in enumerate(range(first_index, first_index + n_cells)):
        spec = cell_spec(i, seed, nodata_every)
        cols, cloud_cover, nodata = _encoded_cell(spec, seed, faults, compress)
        d = out / "L2A" / spec.grid_cell.split("_", 1)[0] / spec.grid_cell / spec.product_id
        d.mkdir(parents=True, exist_ok=True)
        for name, data in cols.items():
            if data is None:
                continue
            (d / ("thumbnail.png" if name == "thumbnail" else f"{name}.tif")).write_bytes(data)
        meta_rows.append(_metadata_row(spec, f"part_{r // 4 + 1:05d}.parquet", r % 4, cloud_cover, nodata))
    meta_rows += [dict(meta_rows[i - first_index]) for i in faults.duplicates]
    if metadata:
        _write_metadata(out / "metadata.parquet", meta_rows)
    return out


AUX_RESOLUTION_DEG = 0.0005  # ~55 m: a 128 px patch covers ~20 x 20+ pixels of the synthetic global rasters
_AUX_TILE_PX = 1024
_AUX_MARGIN_DEG = 0.02
_LANDCOVER_BLOCK_DEG = 0.01  # ~1.1 km land-cover blocks: a patch mixes a few classes


def synthetic_buildings(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Building percent (uint8 0-100) of the synthetic global raster at these coordinates: smooth bumps a few km
    wide with building-free gaps, a pure function of the coordinates (so overlapping cells agree)."""
    u = np.sin(np.radians(lon) * 4000.0) * np.cos(np.radians(lat) * 3100.0)
    v = np.sin(np.radians(lon + lat) * 1700.0)
    return np.clip(70.0 * (u + 0.6 * v), 0, 100).astype(np.uint8)


def synthetic_landcover(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """WorldCover code (uint8; 0 = no-data in about one block of twelve) of the synthetic global raster: blocks of
    _LANDCOVER_BLOCK_DEG, each one class drawn by an integer hash of the block."""
    from phileo.data.aux_targets import LANDCOVER_CODES

    i = np.floor(lat / _LANDCOVER_BLOCK_DEG).astype(np.int64)
    j = np.floor(lon / _LANDCOVER_BLOCK_DEG).astype(np.int64)
    h = ((i * 73856093) ^ (j * 19349663)) % 1000003 % (len(LANDCOVER_CODES) + 1)
    return np.array((0,) + LANDCOVER_CODES, np.uint8)[h]


def write_aux_rasters(root: str | os.PathLike, n_cells: int, seed: int = 0, *, first_index: int = 0,
                      nodata_every: int = 3) -> tuple[Path, Path]:
    """Writes the auxiliary global rasters the published pretraining reads, for synthetic cells `first_index` …:
    `root/aux/build_4326.tif` (building percent) and `root/aux/landcover_4326.tif` (WorldCover codes).

    Both are global EPSG:4326 GeoTIFFs at AUX_RESOLUTION_DEG, tiled and sparse: only the tiles around the cells
    are stored (~3 MB each, mostly the tile index); the rest reads as 0 (no-data, no buildings). Returns
    (buildings path, land-cover path).
    """
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    from phileo.fsutil import atomic_path

    out = Path(root) / "aux"
    out.mkdir(parents=True, exist_ok=True)
    res = AUX_RESOLUTION_DEG
    width, height = round(360 / res), round(180 / res)
    windows = []
    for i in range(first_index, first_index + n_cells):
        spec = cell_spec(i, seed, nodata_every)
        n = CELL_SIZE_PX[10]
        lat, lon = geo.lat_lon_of_pixels(f"EPSG:{spec.epsg}", spec.geotransform, [0, 0, n, n], [0, n, 0, n])
        c0 = max(int(math.floor((lon.min() - _AUX_MARGIN_DEG + 180) / res)), 0)
        c1 = min(int(math.ceil((lon.max() + _AUX_MARGIN_DEG + 180) / res)), width)
        r0 = max(int(math.floor((90 - lat.max() - _AUX_MARGIN_DEG) / res)), 0)
        r1 = min(int(math.ceil((90 - lat.min() + _AUX_MARGIN_DEG) / res)), height)
        windows.append(Window(c0, r0, c1 - c0, r1 - r0))
    paths = (out / "build_4326.tif", out / "landcover_4326.tif")
    for path, field in zip(paths, (synthetic_buildings, synthetic_landcover)):
        with atomic_path(path, fsync=False) as tmp:
            with rasterio.open(tmp, "w", driver="GTiff", width=width, height=height, count=1, dtype="uint8",
                               crs="EPSG:4326", transform=from_origin(-180, 90, res, res), tiled=True,
                               blockxsize=_AUX_TILE_PX, blockysize=_AUX_TILE_PX, compress="deflate",
                               sparse_ok=True, bigtiff="YES") as ds:
                for w in windows:
                    rows = 90 - (w.row_off + np.arange(w.height) + 0.5) * res
                    cols = (w.col_off + np.arange(w.width) + 0.5) * res - 180
                    ds.write(field(rows[:, None], cols[None, :]), 1, window=w)
    return paths


def reference_image(bands: dict[str, np.ndarray]) -> np.ndarray:
    """The whole cell as PhilEO serves it: float32 (10, 1068, 1068) reflectance / 10000 in PHILEO_BANDS order,
    20 m bands bilinearly upsampled ×2 (align_corners=False). The straightforward way, for checking crops."""
    import torch
    import torch.nn.functional as F

    b10 = np.stack([bands[b] for b in BANDS_10M]).astype(np.float32)
    b20 = torch.from_numpy(np.stack([bands[b] for b in BANDS_20M]).astype(np.float32))[None]
    up = F.interpolate(b20, scale_factor=2, mode="bilinear", align_corners=False)[0].numpy()
    return np.concatenate([b10, up]) / 10000.0


def make_pretrain_shards(out_dir: str | os.PathLike, n_cells: int = 8, nodes: int = 1, seed: int = 0,
                         workers: int = 1, aux: bool = True, **convert_kwargs) -> Path:
    """Generates `n_cells` synthetic cells (parquet layout) under `out_dir/source` and converts them into HDF5
    chunks under `out_dir/shards`; returns that folder (holding manifest.json), ready for `PretrainDataset`.
    With `aux` (default) the synthetic global building and land-cover rasters are written too
    (`write_aux_rasters`, under `out_dir/source/aux`) and converted with the cells.

    Chunks are small (at most 2 cells, fewer when `nodes` needs it) so that up to `nodes` (<= n_cells) nodes
    can be served. Calling it again with the same arguments reuses the result; other arguments regenerate it.
    Extra keyword arguments go to `phileo.data.plan.ConvertConfig` (e.g. max_cloud_cover).
    """
    import json
    import shutil

    from phileo.data.chunk_format import MANIFEST_NAME
    from phileo.data.convert import convert
    from phileo.data.plan import ConvertConfig
    from phileo.fsutil import atomic_write_json

    if not 1 <= nodes <= n_cells:
        raise ValueError(f"nodes must be between 1 and n_cells={n_cells}, got {nodes}")
    out_dir = Path(out_dir)
    shards, source, stamp = out_dir / "shards", out_dir / "source", out_dir / "make_pretrain_shards.json"
    args = {"n_cells": n_cells, "nodes": nodes, "seed": seed, "aux": aux,
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(convert_kwargs.items())}}
    if (shards / MANIFEST_NAME).is_file() and stamp.is_file() and json.loads(stamp.read_text()) == args:
        return shards
    for d in (shards, source):
        shutil.rmtree(d, ignore_errors=True)
    # zstd GeoTIFFs: the fastest to encode here; the converter reads any compression.
    write_majortom_parquet(source, n_cells, seed=seed, compress="zstd")
    if aux:
        buildings, landcover = write_aux_rasters(source, n_cells, seed=seed)
        convert_kwargs = {"aux_buildings": buildings, "aux_landcover": landcover, **convert_kwargs}
    cells_per_chunk = convert_kwargs.pop("cells_per_chunk", max(1, min(2, n_cells // nodes)))
    convert(ConvertConfig(source=source, out=shards, nodes=nodes, workers=workers, cells_per_chunk=cells_per_chunk,
                          progress=False, **convert_kwargs))
    atomic_write_json(stamp, args)
    return shards


__all__ = ["CellSpec", "Faults", "cell_spec", "synthetic_cell", "encode_geotiff", "write_majortom_parquet",
           "write_majortom_tree", "write_aux_rasters", "make_pretrain_shards", "reference_image"]
