"""Auxiliary pretraining targets from global rasters: building percent and ESA WorldCover land cover.

The published pretraining reads two global EPSG:4326 rasters, `build_4326.tif` (building percent 0-100) and
`landcover_4326.tif` (WorldCover codes 10 … 100, 0 = no-data), clips both to each patch's footprint and derives:

- buildings: mean / 100 of the clipped pixels; weight 1 when the patch lies within the raster's bounds, else 0
  (target 0);
- land cover: the fractions of the 11 classes (10→1, 20→2, … 90→9, 95→10, 100→11) over the non-zero pixels;
  weight = the non-zero fraction of the pixels, 0 (target [1, 0, …, 0]) when every pixel is no-data or the
  patch is not within the raster's bounds.

Here the work is split in two so that training never opens the global rasters:

1. At conversion (`AuxRaster.sample`), each raster (GeoTIFF or VRT, any CRS) is read windowed over one cell's
   footprint only and resampled onto the cell's 20 m grid (average for buildings, mode for land cover), with
   a marker for the pixels outside the raster's bounds (chunk_format.BUILDINGS_OUTSIDE / LANDCOVER_OUTSIDE).
   Source no-data reads as 0, as the published reader fills it.
2. At training (`buildings_target`, `landcover_target`), the targets of a patch are computed from its window of
   those 20 m arrays (crops are 20 m-aligned, so a patch covers whole pixels).

Differences from clipping the native raster per patch, bounded by the test against a direct clip: the patch's
footprint is its exact (UTM) area rather than the raster pixels its lat/lon box touches, and land cover is
counted over 20 m mode-resampled pixels. A patch counts as within the bounds when every 20 m pixel centre is.
Cells whose footprint crosses the antimeridian are treated as outside (weight 0).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from phileo.data import chunk_format as fmt
from phileo.data.majortom import CELL_SIZE_PX

BUILDINGS, LANDCOVER = "buildings", "landcover"
KINDS = (BUILDINGS, LANDCOVER)
LANDCOVER_CODES = (10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100)  # ESA WorldCover, in class order 1 … 11
N_LANDCOVER = len(LANDCOVER_CODES)
# Code → class 1 … 11; 0 for no-data and for any code WorldCover does not define (so it counts as no-data).
_CLASS_OF_CODE = np.zeros(256, np.uint8)
_CLASS_OF_CODE[list(LANDCOVER_CODES)] = np.arange(1, N_LANDCOVER + 1)
_NO_LANDCOVER = np.eye(1, N_LANDCOVER, dtype=np.float32)[0]  # the published target when the weight is 0

_MARGIN_PX = 2  # source pixels read beyond the footprint (covers the window's rounding and gives the edge context)
_FLAGS = {BUILDINGS: "--aux-buildings", LANDCOVER: "--aux-landcover"}


class AuxRaster:
    """One global auxiliary raster (`kind` 'buildings' or 'landcover'), checked when built.

    Refuses (ValueError naming the flag): a missing or unreadable file, more than one band, no CRS, a
    non-integer land-cover raster. Datasets are opened lazily, one per thread (rasterio handles are not
    thread-safe; the converter samples on its decoder threads), and never pickled.
    """

    def __init__(self, path: str | os.PathLike, kind: str):
        import rasterio

        if kind not in KINDS:
            raise ValueError(f"unknown auxiliary raster kind {kind!r} ({' or '.join(KINDS)})")
        self.path, self.kind = Path(path), kind
        flag = _FLAGS[kind]
        if not self.path.is_file():
            raise ValueError(f"{flag} {self.path}: no such file (give a GeoTIFF or VRT)")
        try:
            with rasterio.open(self.path) as ds:
                count, crs, dtype = ds.count, ds.crs, ds.dtypes[0]
                self.bounds, self.shape = tuple(ds.bounds), (ds.height, ds.width)
        except rasterio.errors.RasterioError as e:
            raise ValueError(f"{flag} {self.path} does not open as a raster ({e}): give a GeoTIFF or VRT") from None
        if count != 1:
            raise ValueError(f"{flag} {self.path} has {count} bands; give a single-band raster")
        if crs is None:
            raise ValueError(f"{flag} {self.path} has no CRS; assign one (e.g. gdal_edit.py -a_srs EPSG:4326)")
        if kind == LANDCOVER and not np.issubdtype(np.dtype(dtype), np.integer):
            raise ValueError(f"{flag} {self.path} is {dtype}; land cover must hold integer WorldCover codes")
        self.crs = crs
        self._local = threading.local()

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_local")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def _dataset(self):
        ds = getattr(self._local, "ds", None)
        if ds is None:
            import rasterio

            ds = self._local.ds = rasterio.open(self.path)
        return ds

    def close(self) -> None:
        """Closes this thread's dataset (the others close when their threads end)."""
        ds = getattr(self._local, "ds", None)
        if ds is not None:
            ds.close()
            self._local.ds = None

    @property
    def outside(self):
        return fmt.BUILDINGS_OUTSIDE if self.kind == BUILDINGS else fmt.LANDCOVER_OUTSIDE

    @property
    def dtype(self):
        return fmt.AUX_DTYPES[fmt.AUX_DATASETS[self.kind]]

    def sample(self, crs: str, geotransform_10m: Sequence[float]) -> np.ndarray:
        """The raster resampled onto the 20 m grid of a cell whose 10 m grid has GDAL `geotransform_10m` in `crs`:
        (534, 534) of self.dtype, `outside` where a pixel centre lies outside the raster's bounds."""
        from affine import Affine
        from rasterio.transform import array_bounds
        from rasterio.warp import transform_bounds

        n = CELL_SIZE_PX[fmt.AUX_RESOLUTION_M]
        x0, dx, rx, y0, ry, dy = (float(v) for v in geotransform_10m)
        dst_transform = Affine(2 * dx, 2 * rx, x0, 2 * ry, 2 * dy, y0)  # the 20 m grid shares the 10 m origin
        out = np.full((n, n), self.outside, self.dtype)
        left, bottom, right, top = transform_bounds(crs, self.crs, *array_bounds(n, n, dst_transform),
                                                    densify_pts=21)
        if not left < right:  # the footprint crosses the antimeridian (or degenerate): treated as outside
            return out
        window = self._window(left, bottom, right, top)
        if window is None:
            return out
        self._resample(window, crs, dst_transform, out)
        self._mark_outside(crs, dst_transform, (left, bottom, right, top), out)
        return out

    def _window(self, left: float, bottom: float, right: float, top: float):
        """The raster window over these bounds (source CRS) plus a margin, cut to the raster; None if empty."""
        from rasterio.errors import WindowError
        from rasterio.windows import Window, from_bounds

        ds = self._dataset()
        w = from_bounds(left, bottom, right, top, transform=ds.transform)
        w = Window(w.col_off - _MARGIN_PX, w.row_off - _MARGIN_PX, w.width + 2 * _MARGIN_PX,
                   w.height + 2 * _MARGIN_PX).round_offsets().round_lengths()
        try:
            w = w.intersection(Window(0, 0, ds.width, ds.height))
        except WindowError:  # no overlap
            return None
        return w if w.width > 0 and w.height > 0 else None

    def _resample(self, window, crs: str, dst_transform, out: np.ndarray) -> None:
        from rasterio.warp import Resampling, reproject

        ds = self._dataset()
        # Source no-data reads as 0, as the published reader fills it (0 = no building, no land-cover class).
        src = ds.read(1, window=window, masked=True)
        if self.kind == BUILDINGS:
            src = src.astype(np.float32).filled(0)
            resampling = Resampling.average
        else:
            src = src.filled(0)
            codes = np.where((src >= 0) & (src < 256), src, 0).astype(np.uint8)
            src = np.where(_CLASS_OF_CODE[codes] > 0, codes, 0).astype(np.uint8)  # unknown codes → no-data
            resampling = Resampling.mode
        # Pixels the warp does not reach keep `outside`; the exact in-bounds rule is applied after.
        reproject(src, out, src_transform=ds.window_transform(window), src_crs=self.crs, src_nodata=None,
                  dst_transform=dst_transform, dst_crs=crs, dst_nodata=self.outside, resampling=resampling)

    def _mark_outside(self, crs: str, dst_transform, footprint: tuple[float, ...], out: np.ndarray) -> None:
        """Sets `outside` where the pixel centre, in the raster's CRS, is outside the raster's bounds (the warp
        extrapolates up to a pixel at an edge). Skipped when the whole footprint is inside (the common case)."""
        from rasterio.warp import transform

        left, bottom, right, top = self.bounds
        if footprint[0] >= left and footprint[1] >= bottom and footprint[2] <= right and footprint[3] <= top:
            return
        n = out.shape[0]
        cols, rows = np.meshgrid(np.arange(n) + 0.5, np.arange(n) + 0.5)
        xs, ys = dst_transform @ (cols.ravel(), rows.ravel())
        sx, sy = (np.asarray(v).reshape(n, n) for v in transform(crs, self.crs, xs, ys))
        out[~((sx >= left) & (sx <= right) & (sy >= bottom) & (sy <= top))] = self.outside


def open_aux_rasters(buildings: str | os.PathLike | None,
                     landcover: str | os.PathLike | None) -> dict[str, AuxRaster]:
    """The auxiliary rasters given ({kind: AuxRaster}; empty when neither is)."""
    given = {BUILDINGS: buildings, LANDCOVER: landcover}
    return {k: AuxRaster(p, k) for k, p in given.items() if p is not None}


def buildings_target(window: np.ndarray) -> tuple[np.float32, np.float32]:
    """(target, weight) of a patch from its window of aux/buildings_20m (percent): mean / 100 and 1, or (0, 0)
    when any pixel lies outside the raster's bounds."""
    if np.isnan(window).any():
        return np.float32(0.0), np.float32(0.0)
    return np.float32(window.mean(dtype=np.float64) / 100.0), np.float32(1.0)


def landcover_target(window: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """(fractions float32 (11,), weight) of a patch from its window of aux/landcover_20m (WorldCover codes): the
    class fractions over the non-zero pixels and the non-zero fraction; ([1, 0, …], 0) when every pixel is
    no-data or any lies outside the raster's bounds."""
    if (window == fmt.LANDCOVER_OUTSIDE).any():
        return _NO_LANDCOVER.copy(), np.float32(0.0)
    counts = np.bincount(_CLASS_OF_CODE[window].ravel(), minlength=N_LANDCOVER + 1)
    valid = int(counts[1:].sum())
    if valid == 0:
        return _NO_LANDCOVER.copy(), np.float32(0.0)
    return (counts[1:] / valid).astype(np.float32), np.float32(valid / window.size)


def no_targets() -> dict[str, np.ndarray | np.float32]:
    """The item keys of a patch without auxiliary data (an older chunk, or a set converted without rasters)."""
    return {"buildings": np.float32(0.0), "buildings_weight": np.float32(0.0),
            "landcover": _NO_LANDCOVER.copy(), "landcover_weight": np.float32(0.0)}


__all__ = ["AuxRaster", "KINDS", "LANDCOVER_CODES", "N_LANDCOVER", "open_aux_rasters", "buildings_target",
           "landcover_target", "no_targets"]
