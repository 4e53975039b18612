"""Geodesy a Sentinel-2 cell needs: UTM → WGS84, the PhilEO coordinate encoding, MajorTOM grid cell names.

UTM → latitude/longitude is done here in closed form (Krüger series, Karney 2011, third order: errors below a millimetre
inside a UTM zone, checked against PROJ in the tests) rather than through GDAL/PROJ, because the dataset computes it for every patch
it serves and a PROJ transformer costs ~100 µs to build; any other CRS falls back to rasterio.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

# WGS84 ellipsoid and UTM constants.
_A = 6378137.0
_F = 1 / 298.257223563
_K0 = 0.9996
_FALSE_EASTING = 500_000.0
_FALSE_NORTHING_SOUTH = 10_000_000.0

_N = _F / (2 - _F)
_A_RECT = _A / (1 + _N) * (1 + _N**2 / 4 + _N**4 / 64)  # rectifying radius
_BETA = (_N / 2 - 2 * _N**2 / 3 + 37 * _N**3 / 96, _N**2 / 48 + _N**3 / 15, 17 * _N**3 / 480)
_DELTA = (2 * _N - 2 * _N**2 / 3 - 2 * _N**3, 7 * _N**2 / 3 - 8 * _N**3 / 5, 56 * _N**3 / 15)
_ALPHA = (_N / 2 - 2 * _N**2 / 3 + 5 * _N**3 / 16, 13 * _N**2 / 48 - 3 * _N**3 / 5, 61 * _N**3 / 240)


def utm_zone_of_epsg(epsg: int) -> tuple[int, bool] | None:
    """(zone, north) for a WGS84 UTM EPSG code (32601-32660 north, 32701-32760 south); None for any other code."""
    if 32601 <= epsg <= 32660:
        return epsg - 32600, True
    if 32701 <= epsg <= 32760:
        return epsg - 32700, False
    return None


def epsg_of_utm(zone: int, north: bool) -> int:
    """The WGS84 UTM EPSG code of a zone (1-60) and hemisphere."""
    if not 1 <= zone <= 60:
        raise ValueError(f"UTM zone must be 1-60, got {zone}")
    return (32600 if north else 32700) + zone


def utm_zone_of_lon(lon: float) -> int:
    """The standard UTM zone of a longitude (no Norway/Svalbard exceptions, as Sentinel-2 tiling uses)."""
    return int((lon + 180) // 6) % 60 + 1


def utm_to_latlon(easting, northing, zone: int, north: bool) -> tuple[np.ndarray, np.ndarray]:
    """WGS84 latitude and longitude in degrees of UTM coordinates (metres); arrays or scalars in, arrays out."""
    x = (np.asarray(easting, dtype=np.float64) - _FALSE_EASTING) / (_K0 * _A_RECT)
    y = np.asarray(northing, dtype=np.float64)
    if not north:
        y = y - _FALSE_NORTHING_SOUTH
    xi = y / (_K0 * _A_RECT)
    eta = x
    xi_p, eta_p = xi.copy(), eta.copy()
    for j, b in enumerate(_BETA, start=1):
        xi_p = xi_p - b * np.sin(2 * j * xi) * np.cosh(2 * j * eta)
        eta_p = eta_p - b * np.cos(2 * j * xi) * np.sinh(2 * j * eta)
    chi = np.arcsin(np.sin(xi_p) / np.cosh(eta_p))
    lat = chi.copy()
    for j, d in enumerate(_DELTA, start=1):
        lat = lat + d * np.sin(2 * j * chi)
    lon0 = math.radians((zone - 1) * 6 - 180 + 3)
    lon = lon0 + np.arctan2(np.sinh(eta_p), np.cos(xi_p))
    lon = (lon + math.pi) % (2 * math.pi) - math.pi
    return np.degrees(lat), np.degrees(lon)


def latlon_to_utm(lat, lon, zone: int) -> tuple[np.ndarray, np.ndarray]:
    """UTM easting/northing in metres of WGS84 lat/lon (degrees) in `zone`; southern points get the 10,000 km
    false northing. The inverse of `utm_to_latlon` (used by the synthetic data generator)."""
    phi = np.radians(np.asarray(lat, dtype=np.float64))
    lam = np.radians(np.asarray(lon, dtype=np.float64)) - math.radians((zone - 1) * 6 - 180 + 3)
    e = math.sqrt(_F * (2 - _F))
    t = np.sinh(np.arctanh(np.sin(phi)) - e * np.arctanh(e * np.sin(phi)))
    xi_p = np.arctan2(t, np.cos(lam))
    eta_p = np.arctanh(np.sin(lam) / np.sqrt(1 + t**2))
    xi, eta = xi_p.copy(), eta_p.copy()
    for j, a in enumerate(_ALPHA, start=1):
        xi = xi + a * np.sin(2 * j * xi_p) * np.cosh(2 * j * eta_p)
        eta = eta + a * np.cos(2 * j * xi_p) * np.sinh(2 * j * eta_p)
    easting = _FALSE_EASTING + _K0 * _A_RECT * eta
    northing = _K0 * _A_RECT * xi
    northing = np.where(np.asarray(lat) < 0, northing + _FALSE_NORTHING_SOUTH, northing)
    return easting, northing


def crs_to_latlon(crs: str, x, y) -> tuple[np.ndarray, np.ndarray]:
    """Latitude/longitude (degrees) of points given in `crs` ('EPSG:<code>' or WKT).

    UTM codes are converted in closed form; anything else goes through rasterio (PROJ).
    """
    m = re.fullmatch(r"EPSG:(\d+)", crs.strip(), flags=re.IGNORECASE)
    if m:
        utm = utm_zone_of_epsg(int(m.group(1)))
        if utm is not None:
            return utm_to_latlon(x, y, *utm)
    from rasterio.warp import transform

    xs = np.atleast_1d(np.asarray(x, dtype=np.float64))
    ys = np.atleast_1d(np.asarray(y, dtype=np.float64))
    lon, lat = transform(crs, "EPSG:4326", xs.tolist(), ys.tolist())
    return np.asarray(lat).reshape(np.shape(x)), np.asarray(lon).reshape(np.shape(x))


def encode_coords(lat: float, lon: float) -> np.ndarray:
    """PhilEO's coordinate target: (sin, cos) of latitude and longitude mapped to a full turn, rescaled to [0, 1].

    lat_enc = (lat + 90) / 180 · 2π, lon_enc = (lon + 180) / 360 · 2π; returns float32
    [(sin lat_enc + 1)/2, (cos lat_enc + 1)/2, (sin lon_enc + 1)/2, (cos lon_enc + 1)/2].
    """
    lat_enc = (lat + 90.0) / 180.0 * 2 * math.pi
    lon_enc = (lon + 180.0) / 360.0 * 2 * math.pi
    v = np.array([math.sin(lat_enc), math.cos(lat_enc), math.sin(lon_enc), math.cos(lon_enc)], dtype=np.float64)
    return ((v + 1.0) / 2.0).astype(np.float32)


# MajorTOM grid: rows every ~10 km along a meridian, columns every ~10 km along the row's parallel.
GRID_SPACING_KM = 10.0
_KM_PER_DEG_LAT = 2 * math.pi * 6371.0088 / 360
_GRID_CELL_RE = re.compile(r"^(\d+)([UD])_(\d+)([RL])$")


def parse_grid_cell(grid_cell: str) -> tuple[int, int]:
    """Signed (row, col) of a MajorTOM grid cell name like '454U_120R' (D rows and L columns negative).

    Refuses anything not of the form <digits><U|D>_<digits><R|L>.
    """
    m = _GRID_CELL_RE.match(grid_cell)
    if not m:
        raise ValueError(f"not a MajorTOM grid cell name: {grid_cell!r} (expected e.g. '454U_120R')")
    row = int(m.group(1)) * (1 if m.group(2) == "U" else -1)
    col = int(m.group(3)) * (1 if m.group(4) == "R" else -1)
    return row, col


def grid_cell_name(row: int, col: int) -> str:
    """The MajorTOM name of a signed (row, col)."""
    return f"{abs(row)}{'U' if row >= 0 else 'D'}_{abs(col)}{'R' if col >= 0 else 'L'}"


def grid_cell_centre(grid_cell: str) -> tuple[float, float]:
    """Approximate (lat, lon) of a grid cell's centre on a 10 km MajorTOM-like grid (used to place synthetic
    cells; real cells carry their own CRS and geotransform, which the dataset uses instead)."""
    row, col = parse_grid_cell(grid_cell)
    lat = row * GRID_SPACING_KM / _KM_PER_DEG_LAT
    lon = col * GRID_SPACING_KM / (_KM_PER_DEG_LAT * max(math.cos(math.radians(lat)), 1e-6))
    return lat, lon


def lat_lon_of_pixels(crs: str, geotransform: Sequence[float], rows, cols) -> tuple[np.ndarray, np.ndarray]:
    """Lat/lon of fractional pixel positions (row, col; 0.0 is the top-left corner of pixel 0) of a raster with
    a GDAL geotransform (x0, dx, rx, y0, ry, dy)."""
    x0, dx, rx, y0, ry, dy = (float(v) for v in geotransform)
    rows = np.asarray(rows, dtype=np.float64)
    cols = np.asarray(cols, dtype=np.float64)
    x = x0 + cols * dx + rows * rx
    y = y0 + cols * ry + rows * dy
    return crs_to_latlon(crs, x, y)
