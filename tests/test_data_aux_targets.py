"""Auxiliary pretraining targets (phileo.data.aux_targets): global building / land-cover rasters → the converter's
aux/ datasets → PretrainDataset's `buildings`, `landcover` and their weights, checked against a direct rasterio
clip of the global raster over each patch's footprint (a separate code path: polygon mask on native pixels)."""

import json

import h5py
import numpy as np
import pytest
import rasterio
from rasterio.features import geometry_mask
from rasterio.transform import from_origin
from rasterio.warp import transform as warp_transform
from rasterio.windows import from_bounds

from phileo.data import PretrainDataset
from phileo.data import chunk_format as fmt
from phileo.data.aux_targets import LANDCOVER_CODES, AuxRaster, buildings_target, landcover_target
from phileo.data.cli import main as convert_main
from phileo.data.convert import convert
from phileo.data.plan import ConvertConfig
from phileo.data.synthetic import cell_spec, make_pretrain_shards, write_aux_rasters, write_majortom_parquet

# Tolerances of the converter's 20 m resampling against the native-pixel clip (synthetic rasters at ~55 m).
# Measured worst cases over the 156 grid patches of 3 cells: 0.0046, 0.053, 0.014 (the test prints them).
BUILDINGS_ATOL = 0.01      # target units (fraction of the patch built up), the percent mean / 100
LANDCOVER_L1_ATOL = 0.08   # sum over the 11 classes of |fraction difference|
WEIGHT_ATOL = 0.04         # land-cover weight (non-zero fraction)


def _clip(path, crs, gt, r, c, p):
    """The global raster's native pixels whose centres lie in the patch's footprint (its 4 corners, densified,
    transformed to the raster's CRS): a direct clip, independent of the converter."""
    x0, dx, _, y0, _, dy = gt
    t = np.linspace(0, 1, 9)
    rows = np.concatenate([np.zeros(9), t, np.ones(9), t[::-1]]) * p + r
    cols = np.concatenate([t, np.ones(9), t[::-1], np.zeros(9)]) * p + c
    with rasterio.open(path) as ds:
        xs, ys = warp_transform(crs, ds.crs, list(x0 + cols * dx), list(y0 + rows * dy))
        win = from_bounds(min(xs), min(ys), max(xs), max(ys), ds.transform).round_offsets().round_lengths()
        win = rasterio.windows.Window(win.col_off - 1, win.row_off - 1, win.width + 2, win.height + 2)
        arr = ds.read(1, window=win, boundless=True, fill_value=0)
        poly = {"type": "Polygon", "coordinates": [list(zip(xs, ys))]}
        inside = geometry_mask([poly], arr.shape, ds.window_transform(win), invert=True)
    return arr[inside]


def _direct_targets(b_px, l_px):
    build = b_px.astype(np.float64).mean() / 100.0
    nonzero = np.count_nonzero(l_px)
    fractions = np.array([np.count_nonzero(l_px == code) for code in LANDCOVER_CODES]) / max(nonzero, 1)
    return build, fractions, nonzero / l_px.size


@pytest.fixture(scope="module")
def aux_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("aux_set")
    return make_pretrain_shards(root, n_cells=3, nodes=1, cells_per_chunk=2), root / "source" / "aux"


def test_targets_match_a_direct_clip_of_the_raster(aux_set):
    shards, aux_dir = aux_set
    ds = PretrainDataset(shards, random_crop=False)
    assert ds.aux_targets == {"buildings", "landcover"} and len(ds) > 100
    worst = np.zeros(3)
    for i in range(len(ds)):
        item = ds[i]
        cell, r, c = ds.crop_offset(i)
        crs, gt = ds._crs_table[ds._crs[cell]], ds._geotransform[cell]
        b = _clip(aux_dir / "build_4326.tif", crs, gt, r, c, ds.patch_size)
        lc = _clip(aux_dir / "landcover_4326.tif", crs, gt, r, c, ds.patch_size)
        assert b.size > 300  # the footprint covers hundreds of native pixels: a real comparison
        build, fractions, weight = _direct_targets(b, lc)
        assert item["buildings_weight"] == 1.0  # the synthetic rasters are global
        assert item["landcover"].shape == (11,) and item["landcover"].dtype == np.float32
        err = (abs(float(item["buildings"]) - build), np.abs(item["landcover"] - fractions).sum(),
               abs(float(item["landcover_weight"]) - weight))
        worst = np.maximum(worst, err)
        assert err[0] <= BUILDINGS_ATOL and err[1] <= LANDCOVER_L1_ATOL and err[2] <= WEIGHT_ATOL, (i, err)
    print("worst |buildings|, L1 land cover, |land-cover weight|:", worst)
    # The targets vary (so the comparison could fail): several classes, built-up and empty patches.
    items = [ds[i] for i in range(len(ds))]
    assert np.ptp([float(x["buildings"]) for x in items]) > 0.2
    assert (np.stack([x["landcover"] for x in items]) > 0).any(axis=0).sum() == 11


def test_chunks_store_the_rasters_on_the_20m_grid_with_schema_2(aux_set):
    shards, _ = aux_set
    m = json.loads((shards / fmt.MANIFEST_NAME).read_text())
    assert m["schema_version"] == fmt.SCHEMA_VERSION == 2
    with h5py.File(shards / fmt.chunk_relpath(0), "r") as f:
        # Schema 2's additions, written out by hand (a rename or dtype change must bump the version).
        assert f["aux/buildings_20m"].dtype == np.float32 and f["aux/buildings_20m"].shape == (2, 534, 534)
        assert f["aux/landcover_20m"].dtype == np.uint8 and f["aux/landcover_20m"].shape == (2, 534, 534)
        assert set(f["aux"]) == {"buildings_20m", "landcover_20m"}
        assert f.attrs["aux_buildings"].endswith("build_4326.tif")
        assert f.attrs["aux_landcover"].endswith("landcover_4326.tif")
        codes = np.unique(f["aux/landcover_20m"][...])
    assert set(codes) <= {0, *LANDCOVER_CODES} and len(codes) >= 10


def test_a_raster_covering_part_of_a_cell_in_another_crs(tmp_path):
    """A regional raster in Web Mercator over the western part of a cell: patches inside get weight 1 and match
    the clip, patches reaching past its edge get weight 0 (the published 'within the raster's bounds')."""
    spec = cell_spec(0)
    src = write_majortom_parquet(tmp_path / "src", 1, compress="zstd").parent
    b_global, l_global = write_aux_rasters(tmp_path / "src", 1)
    # The cell's centre in EPSG:3857; the raster ends 1 km east of it.
    x0, _, _, y0, _, _ = spec.geotransform
    (cx,), (cy,) = warp_transform(f"EPSG:{spec.epsg}", "EPSG:3857", [x0 + 5340.0], [y0 - 5340.0])
    res, half = 50.0, 20_000.0
    paths = {}
    for name, g in (("b", b_global), ("l", l_global)):
        with rasterio.open(g) as gds:
            west, north = cx - half, cy + half
            shape = (int(2 * half / res), int((half + 1000.0) / res))
            arr = np.empty(shape, np.uint8)
            rasterio.warp.reproject(rasterio.band(gds, 1), arr, dst_transform=from_origin(west, north, res, res),
                                    dst_crs="EPSG:3857", resampling=rasterio.warp.Resampling.nearest)
        paths[name] = tmp_path / f"{name}_3857.tif"
        with rasterio.open(paths[name], "w", driver="GTiff", width=shape[1], height=shape[0], count=1,
                           dtype="uint8", crs="EPSG:3857", transform=from_origin(west, north, res, res)) as d:
            d.write(arr, 1)
    convert(ConvertConfig(source=src, out=tmp_path / "out", aux_buildings=paths["b"], aux_landcover=paths["l"],
                          progress=False))
    ds = PretrainDataset(tmp_path / "out", random_crop=False)
    inside = outside = 0
    for i in range(len(ds)):
        item = ds[i]
        cell, r, c = ds.crop_offset(i)
        gt = ds._geotransform[cell]
        corners_x = [gt[0] + (c + dc) * 10.0 for dc in (0, ds.patch_size)]
        xs, _ = warp_transform(f"EPSG:{spec.epsg}", "EPSG:3857", corners_x * 2,
                               [gt[3] - (r + dr) * 10.0 for dr in (0, 0, ds.patch_size, ds.patch_size)])
        if max(xs) < cx + 1000.0 - 40:  # wholly inside (a 20 m pixel's margin)
            inside += 1
            assert item["buildings_weight"] == 1.0
            b = _clip(paths["b"], f"EPSG:{spec.epsg}", gt, r, c, ds.patch_size)
            lc = _clip(paths["l"], f"EPSG:{spec.epsg}", gt, r, c, ds.patch_size)
            build, fractions, _ = _direct_targets(b, lc)
            assert abs(float(item["buildings"]) - build) <= BUILDINGS_ATOL
            assert np.abs(item["landcover"] - fractions).sum() <= LANDCOVER_L1_ATOL + 0.04  # 50 m resampled twice
        elif min(xs) > cx + 1000.0 + 40:  # wholly outside
            outside += 1
            assert item["buildings_weight"] == 0.0 and item["buildings"] == 0.0
            assert item["landcover_weight"] == 0.0
        if min(xs) < cx + 1000.0 < max(xs) - 40:  # straddling the edge: not within the bounds
            assert item["buildings_weight"] == 0.0 and item["landcover_weight"] == 0.0
    assert inside >= 8 and outside >= 8


def test_older_and_aux_free_sets_load_with_weight_zero(tmp_path):
    shards = make_pretrain_shards(tmp_path, n_cells=1, nodes=1, aux=False)
    doc = json.loads((shards / fmt.MANIFEST_NAME).read_text())
    doc["schema_version"] = 1  # a set written before the auxiliary targets
    (shards / fmt.MANIFEST_NAME).write_text(json.dumps(doc))
    ds = PretrainDataset(shards, random_crop=True)
    item = ds[0]
    assert ds.aux_targets == frozenset()
    assert item["buildings_weight"] == 0.0 and item["landcover_weight"] == 0.0
    assert item["landcover"].shape == (11,) and {"image", "coords", "cloud_fraction", "window"} <= set(item)


def test_per_patch_rules_follow_the_published_semantics():
    w = np.zeros((4, 4), np.uint8)
    assert landcover_target(w)[1] == 0.0 and landcover_target(w)[0][0] == 1.0  # all no-data
    w[:2] = 95   # mangrove → class 10
    w[2, :2] = 100  # moss → class 11
    w[2, 2] = 10    # trees → class 1
    w[3, 3] = 7     # not a WorldCover code: no-data
    frac, weight = landcover_target(w)
    np.testing.assert_allclose(frac, np.array([1, 0, 0, 0, 0, 0, 0, 0, 0, 8, 2]) / 11, rtol=1e-6)
    assert weight == pytest.approx(11 / 16)
    w[0, 0] = fmt.LANDCOVER_OUTSIDE
    assert landcover_target(w)[1] == 0.0
    b = np.full((4, 4), 30.0, np.float32)
    assert buildings_target(b) == (pytest.approx(0.3), 1.0)
    b[1, 1] = np.nan
    assert buildings_target(b) == (0.0, 0.0)


def test_bad_rasters_are_refused_naming_the_flag(tmp_path, capsys):
    three = tmp_path / "three.tif"
    with rasterio.open(three, "w", driver="GTiff", width=4, height=4, count=3, dtype="uint8", crs="EPSG:4326",
                       transform=from_origin(0, 4, 1, 1)) as d:
        d.write(np.zeros((3, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="--aux-landcover .*3 bands"):
        AuxRaster(three, "landcover")
    rc = convert_main(["--source", str(tmp_path), "--out", str(tmp_path / "o"),
                       "--aux-buildings", str(tmp_path / "missing.tif")])
    assert rc == 2 and "--aux-buildings" in capsys.readouterr().err


def test_launch_preprocess_passes_the_rasters_to_every_stage_as_absolute_paths(tmp_path, monkeypatch):
    from phileo.launch.preprocess import build_parser, converter_argv

    monkeypatch.chdir(tmp_path)
    args, extra = build_parser().parse_known_args(["--source", "src", "--out", "out", "--tasks", "2",
                                                   "--aux-buildings", "b.tif", "--aux-landcover", "l.vrt"])
    args.workers = 1
    cmds = converter_argv(args, extra)
    for argv in [cmds["plan"], *cmds["tasks"]]:
        i, j = argv.index("--aux-buildings"), argv.index("--aux-landcover")
        assert argv[i + 1] == str(tmp_path / "b.tif") and argv[j + 1] == str(tmp_path / "l.vrt")


def test_a_vrt_reads_like_its_geotiff(aux_set, tmp_path):
    _, aux_dir = aux_set
    tif = aux_dir / "landcover_4326.tif"
    with rasterio.open(tif) as ds:
        w, h, gt = ds.width, ds.height, ds.transform.to_gdal()
    vrt = tmp_path / "landcover.vrt"  # the smallest VRT GDAL accepts: one band, one source (test data)
    vrt.write_text(
        f'<VRTDataset rasterXSize="{w}" rasterYSize="{h}"><SRS>EPSG:4326</SRS>'
        f'<GeoTransform>{", ".join(map(repr, gt))}</GeoTransform><VRTRasterBand dataType="Byte" band="1">'
        f'<SimpleSource><SourceFilename relativeToVRT="0">{tif}</SourceFilename><SourceBand>1</SourceBand>'
        f'</SimpleSource></VRTRasterBand></VRTDataset>')
    spec = cell_spec(1)
    direct = AuxRaster(tif, "landcover").sample(f"EPSG:{spec.epsg}", spec.geotransform)
    through_vrt = AuxRaster(vrt, "landcover").sample(f"EPSG:{spec.epsg}", spec.geotransform)
    np.testing.assert_array_equal(through_vrt, direct)
    assert len(np.unique(direct)) >= 10
