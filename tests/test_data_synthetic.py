"""The synthetic MajorTOM generator writes exactly the published layouts, with realistic, learnable cells."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from rasterio.io import MemoryFile
from rasterio.warp import transform

from _preprocess_fixtures import FAULTS, N_CELLS, SEED, parquet_source
from phileo.data.majortom import ALL_BANDS, BAND_RESOLUTION_M, CELL_SIZE_PX
from phileo.data.synthetic import cell_spec, synthetic_cell, write_majortom_tree


def _decode(b: bytes):
    with MemoryFile(b) as mf, mf.open() as ds:
        return ds.read(1), ds.crs, ds.transform, ds.profile


def test_parquet_layout_matches_the_published_one(tmp_path_factory):
    root = parquet_source(tmp_path_factory) / "Core-S2L2A"
    shards = sorted((root / "images").glob("part_*.parquet"))
    assert [s.name for s in shards] == ["part_00001.parquet", "part_00002.parquet"]
    pf = pq.ParquetFile(shards[0])
    assert pf.schema_arrow.names == (["product_id", "grid_cell", "product_datetime", "thumbnail"] + list(ALL_BANDS)
                                     + ["cloud_mask"])
    # One cell per row group.
    assert pf.metadata.num_row_groups == 4
    assert all(pf.metadata.row_group(i).num_rows == 1 for i in range(4))
    row = pf.read_row_group(0).to_pylist()[0]
    spec = cell_spec(0, SEED)
    assert (row["grid_cell"], row["product_id"]) == (spec.grid_cell, spec.product_id)
    assert row["thumbnail"][:2] == b"\xff\xd8"  # JPEG
    for band in ALL_BANDS + ("cloud_mask",):
        arr, crs, tr, prof = _decode(row[band])
        res = BAND_RESOLUTION_M.get(band, 10)
        assert arr.shape == (CELL_SIZE_PX[res],) * 2
        assert crs.to_epsg() == spec.epsg and 32601 <= spec.epsg <= 32760
        assert (tr.a, tr.e) == (res, -res) and (tr.c, tr.f) == spec.geotransform[::3][:2]
        assert arr.dtype == (np.uint8 if band == "cloud_mask" else np.uint16)
    # The cell's centre, projected back from its UTM geotransform, is the grid cell's centre.
    x0, _, _, y0, _, _ = spec.geotransform
    lon, lat = transform(f"EPSG:{spec.epsg}", "EPSG:4326", [x0 + 5340], [y0 - 5340])
    assert abs(lat[0] - spec.centre_lat) < 0.01 and abs(lon[0] - spec.centre_lon) < 0.01


def test_metadata_parquet_lists_every_row_with_its_location(tmp_path_factory):
    root = parquet_source(tmp_path_factory) / "Core-S2L2A"
    meta = pq.read_table(root / "metadata.parquet").to_pylist()
    assert len(meta) == N_CELLS + len(FAULTS["duplicates"])
    assert {"grid_cell", "grid_row_u", "grid_col_r", "product_id", "timestamp", "cloud_cover", "nodata",
            "centre_lat", "centre_lon", "crs", "parquet_url", "parquet_row"} <= set(meta[0])
    for m in meta:
        shard = pq.ParquetFile(root / "images" / m["parquet_url"].rsplit("/", 1)[1])
        row = shard.read_row_group(m["parquet_row"], columns=["grid_cell", "product_id"]).to_pylist()[0]
        assert (row["grid_cell"], row["product_id"]) == (m["grid_cell"], m["product_id"])
    nodata = {m["grid_cell"]: m["nodata"] for m in meta}
    assert nodata[cell_spec(1, SEED).grid_cell] > 0.04 and nodata[cell_spec(0, SEED).grid_cell] == 0


def test_tree_layout_holds_the_same_bytes(tmp_path_factory, tmp_path):
    proot = parquet_source(tmp_path_factory) / "Core-S2L2A"
    troot = write_majortom_tree(tmp_path, 1, seed=SEED, first_index=2)
    spec = cell_spec(2, SEED)
    d = troot / "L2A" / spec.grid_cell.split("_")[0] / spec.grid_cell / spec.product_id
    assert sorted(p.name for p in d.iterdir()) == sorted([f"{b}.tif" for b in ALL_BANDS]
                                                         + ["cloud_mask.tif", "thumbnail.png"])
    row = pq.ParquetFile(proot / "images" / "part_00001.parquet").read_row_group(2).to_pylist()[0]
    assert (d / "B05.tif").read_bytes() == row["B05"]
    assert (d / "thumbnail.png").read_bytes() == row["thumbnail"]
    assert len(pq.read_table(troot / "metadata.parquet")) == 1


def test_faults_are_injected_where_asked(tmp_path_factory):
    root = parquet_source(tmp_path_factory) / "Core-S2L2A"
    rows = pq.ParquetFile(root / "images" / "part_00002.parquet").read().to_pylist()
    by_cell = {}
    for r in rows:
        by_cell.setdefault(r["grid_cell"], []).append(r)
    dup = by_cell[cell_spec(1, SEED).grid_cell]
    assert len(dup) == 1 and dup[0]["B02"] is not None  # cell 1 lives in shard 1; its duplicate is here
    trunc = by_cell[cell_spec(5, SEED).grid_cell][0]
    with pytest.raises(rasterio.errors.RasterioIOError):
        _decode(trunc["B04"])
    assert by_cell[cell_spec(6, SEED).grid_cell][0]["B8A"] is None
    assert _decode(by_cell[cell_spec(7, SEED).grid_cell][0]["B11"])[0].shape == (533, 534)


def test_cells_are_smooth_structured_and_clouds_are_visible():
    # Find a cell with clouds and no no-data among the first few.
    for i in range(0, 12, 3):
        bands, mask, thumb = synthetic_cell(cell_spec(i, 11), 11)
        if 0.05 < np.mean(mask == 1) < 0.6:
            break
    else:
        pytest.fail("no partly cloudy cell among the first ones")
    b04 = bands["B04"].astype(np.float64)
    # Smooth: neighbouring pixels are far more alike than random pairs (white noise would give ~0).
    corr = np.corrcoef(b04[:, :-1].ravel(), b04[:, 1:].ravel())[0, 1]
    assert corr > 0.9
    # Clouds are bright: thick-cloud pixels are brighter than clear ones in every band.
    for b in ("B02", "B04", "B08"):
        assert bands[b][mask == 1].mean() > bands[b][mask == 0].mean() + 1000
    # 20 m bands are the 2x2 block means of the same scene: they correlate with the 10 m bands.
    b8a = bands["B8A"].astype(np.float64)
    b08 = bands["B08"].astype(np.float64).reshape(534, 2, 534, 2).mean(axis=(1, 3))
    assert np.corrcoef(b8a.ravel(), b08.ravel())[0, 1] > 0.9
    from PIL import Image

    assert Image.open(io.BytesIO(thumb)).format == "JPEG"


def test_nodata_edge_is_zero_in_every_band_and_the_mask():
    spec = cell_spec(1, SEED)
    bands, mask, _ = synthetic_cell(spec, SEED)
    nd = bands["B02"] == 0
    assert 0.04 < nd.mean() < 0.55
    assert all((bands[b][nd] == 0).all() for b in ("B03", "B04", "B08")) and (mask[nd] == 0).all()
    assert (bands["B05"] == 0).mean() == pytest.approx(nd.mean(), abs=0.01)
    assert (bands["B02"][~nd] > 0).all()  # valid pixels are never 0, so 0 means no-data
