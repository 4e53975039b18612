"""UTM ↔ WGS84 in closed form against PROJ, the PhilEO coordinate encoding, MajorTOM grid cell names."""

import math

import numpy as np
import pytest
from rasterio.warp import transform

from phileo.data import geo


@pytest.mark.parametrize("epsg", [32633, 32601, 32660, 32717, 32760])
def test_utm_to_latlon_matches_proj(epsg):
    rng = np.random.default_rng(epsg)
    zone, north = geo.utm_zone_of_epsg(epsg)
    e = rng.uniform(166_000, 834_000, 300)
    n = rng.uniform(0, 9_300_000, 300) if north else rng.uniform(1_200_000, 9_999_000, 300)
    lon_ref, lat_ref = transform(f"EPSG:{epsg}", "EPSG:4326", e.tolist(), n.tolist())
    lat, lon = geo.utm_to_latlon(e, n, zone, north)
    # 1e-7 degree is about 1 cm on the ground.
    assert np.abs(lat - np.array(lat_ref)).max() < 1e-7
    assert np.abs(lon - np.array(lon_ref)).max() < 1e-7


def test_latlon_to_utm_inverts_utm_to_latlon():
    rng = np.random.default_rng(0)
    lat = rng.uniform(-79, 83, 200)
    lon = rng.uniform(-179, 179, 200)
    for la, lo in zip(lat, lon):
        zone = geo.utm_zone_of_lon(lo)
        e, n = geo.latlon_to_utm(la, lo, zone)
        la2, lo2 = geo.utm_to_latlon(e, n, zone, la >= 0)
        assert abs(la2 - la) < 1e-8 and abs(lo2 - lo) < 1e-8


def test_crs_to_latlon_falls_back_to_proj_for_other_crs():
    # Web Mercator is not UTM: must go through rasterio and still be right.
    x, y = transform("EPSG:4326", "EPSG:3857", [12.5], [41.9])
    lat, lon = geo.crs_to_latlon("EPSG:3857", x[0], y[0])
    assert abs(float(lat) - 41.9) < 1e-9 and abs(float(lon) - 12.5) < 1e-9


def test_encode_coords_follows_the_published_formula():
    # lat 0, lon 0: lat_enc = lon_enc = pi -> sin 0, cos -1 -> rescaled (0.5, 0.0, 0.5, 0.0).
    np.testing.assert_allclose(geo.encode_coords(0.0, 0.0), [0.5, 0.0, 0.5, 0.0], atol=1e-7)
    # lat 45, lon 90: lat_enc = 135/180*2pi = 1.5pi -> (sin -1, cos 0); lon_enc = 270/360*2pi = 1.5pi likewise.
    np.testing.assert_allclose(geo.encode_coords(45.0, 90.0), [0.0, 0.5, 0.0, 0.5], atol=1e-7)
    v = geo.encode_coords(-33.9, 18.4)
    assert v.dtype == np.float32 and v.shape == (4,) and (v >= 0).all() and (v <= 1).all()
    lat_enc = (-33.9 + 90) / 180 * 2 * math.pi
    assert v[0] == pytest.approx((math.sin(lat_enc) + 1) / 2, abs=1e-6)


def test_grid_cell_names_round_trip_and_refuse_garbage():
    assert geo.parse_grid_cell("454U_120R") == (454, 120)
    assert geo.parse_grid_cell("12D_7L") == (-12, -7)
    assert geo.grid_cell_name(-12, -7) == "12D_7L"
    lat, lon = geo.grid_cell_centre("454U_120R")
    assert 40 < lat < 42 and 13 < lon < 16  # 454 rows of ~10 km north, 120 columns of ~7.6 km east
    with pytest.raises(ValueError, match="not a MajorTOM grid cell"):
        geo.parse_grid_cell("454_120")
