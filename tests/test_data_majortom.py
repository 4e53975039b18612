"""Readers of both MajorTOM layouts: detection, listing, identical arrays, and every fault as a CellError."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from _preprocess_fixtures import FAULTS, GOOD, N_CELLS, SEED, parquet_source, tree_source
from phileo.data.majortom import (ALL_BANDS, CellError, MajorTOMSource, PHILEO_BANDS, normalise_timestamp,
                                  timestamp_of_product_id)
from phileo.data.synthetic import cell_spec, synthetic_cell


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return parquet_source(tmp_path_factory), tree_source(tmp_path_factory)


def test_layouts_are_detected_from_several_entry_points(sources):
    proot, troot = sources
    assert MajorTOMSource(proot).layout == "parquet"
    assert MajorTOMSource(proot / "Core-S2L2A").layout == "parquet"
    assert MajorTOMSource(proot / "Core-S2L2A" / "images").layout == "parquet"
    assert MajorTOMSource(troot).layout == "tree"
    with pytest.raises(ValueError, match="layout must be"):
        MajorTOMSource(proot, layout="zarr")


def test_a_folder_without_majortom_data_is_refused_with_the_expected_paths(tmp_path):
    (tmp_path / "something").mkdir()
    with pytest.raises(FileNotFoundError, match=r"Core-S2L2A/images/part_\*\.parquet.*L2A/<row>"):
        MajorTOMSource(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        MajorTOMSource(tmp_path / "absent")


@pytest.mark.parametrize("use_metadata", [True, False])
def test_listing_finds_every_row_including_duplicates(sources, use_metadata):
    for root in sources:
        src = MajorTOMSource(root, use_metadata=use_metadata)
        refs = src.list_cells()
        keys = [r.key for r in refs]
        expected = {(cell_spec(i, SEED).grid_cell, cell_spec(i, SEED).product_id) for i in range(N_CELLS)}
        assert set(keys) == expected
        # The parquet has the duplicate row twice; the tree can only show it twice through its metadata.
        n_dup = len(FAULTS["duplicates"]) if (src.layout == "parquet" or use_metadata) else 0
        assert len(keys) == N_CELLS + n_dup
        if use_metadata:
            assert all(r.timestamp for r in refs)


def test_same_cell_gives_identical_arrays_in_both_layouts_and_matches_the_generator(sources):
    p, t = (MajorTOMSource(r, use_metadata=False) for r in sources)
    prefs = {r.key: r for r in p.list_cells()}
    trefs = {r.key: r for r in t.list_cells()}
    for i in (0, 1):
        spec = cell_spec(i, SEED)
        key = (spec.grid_cell, spec.product_id)
        a = p.read_cell(prefs[key], bands=ALL_BANDS)
        b = t.read_cell(trefs[key], bands=ALL_BANDS)
        truth, mask, _ = synthetic_cell(spec, SEED)
        for band in ALL_BANDS:
            np.testing.assert_array_equal(a.bands[band], b.bands[band])
            np.testing.assert_array_equal(a.bands[band], truth[band])
        np.testing.assert_array_equal(a.cloud_mask, b.cloud_mask)
        np.testing.assert_array_equal(a.cloud_mask, mask)
        assert a.crs == b.crs == f"EPSG:{spec.epsg}"
        assert a.transform == b.transform == spec.geotransform
        assert a.timestamp == b.timestamp == f"{spec.sensing_time:%Y-%m-%dT%H:%M:%SZ}"


def test_parquet_reads_one_row_group_and_only_the_needed_columns(sources, monkeypatch):
    calls = []
    orig = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kw):
        calls.append((i, tuple(columns) if columns is not None else None))
        return orig(self, i, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    src = MajorTOMSource(sources[0])
    ref = src.list_cells()[0]
    src.read_cell(ref)
    assert len(calls) == 1 and calls[0][0] == ref.row_group
    cols = set(calls[0][1])
    assert set(PHILEO_BANDS) | {"cloud_mask"} <= cols
    assert not cols & {"B01", "B09", "thumbnail"}


@pytest.mark.parametrize("layout", [0, 1])
def test_faulty_cells_raise_a_cell_error_with_the_reason(sources, layout):
    src = MajorTOMSource(sources[layout], use_metadata=False)
    refs = {r.grid_cell: r for r in src.list_cells()}
    reasons = {}
    for kind in ("truncated", "missing_band", "wrong_size"):
        (i,) = FAULTS[kind]
        with pytest.raises(CellError) as e:
            src.read_cell(refs[cell_spec(i, SEED).grid_cell])
        reasons[kind] = e.value.reason
    assert "B04" in reasons["truncated"] and "does not decode" in reasons["truncated"]
    assert "B8A" in reasons["missing_band"] and "missing" in reasons["missing_band"]
    assert "B11" in reasons["wrong_size"] and "533×534" in reasons["wrong_size"]
    for i in GOOD:
        src.read_cell(refs[cell_spec(i, SEED).grid_cell])  # the good ones still read


def test_stale_metadata_row_is_reported_not_misread(sources, tmp_path):
    import shutil

    import pyarrow as pa

    root = tmp_path / "copy"
    shutil.copytree(sources[0], root)
    meta_path = root / "Core-S2L2A" / "metadata.parquet"
    t = pq.read_table(meta_path).to_pydict()
    t["parquet_row"][0], t["parquet_row"][1] = t["parquet_row"][1], t["parquet_row"][0]
    pq.write_table(pa.table(t), meta_path)
    src = MajorTOMSource(root)
    ref = next(r for r in src.list_cells() if r.grid_cell == t["grid_cell"][0])
    with pytest.raises(CellError, match="stale metadata"):
        src.read_cell(ref)


def test_missing_shards_of_a_partial_download_are_counted_not_rejected(sources, tmp_path):
    import shutil

    root = tmp_path / "partial"
    shutil.copytree(sources[0], root)
    (root / "Core-S2L2A" / "images" / "part_00002.parquet").unlink()
    src = MajorTOMSource(root)
    refs = src.list_cells()
    assert len(refs) == 4 and src.not_present == ["part_00002.parquet"]
    assert src.not_present_cells == N_CELLS - 4 + len(FAULTS["duplicates"])


def test_timestamps_in_every_published_form():
    want = "2020-08-15T10:20:31Z"
    assert normalise_timestamp("20200815T102031") == want
    assert normalise_timestamp("2020-08-15 10:20:31") == want
    assert normalise_timestamp("2020-08-15T12:20:31+02:00") == want
    assert timestamp_of_product_id("S2A_MSIL2A_20200815T102031_N0214_R065_T32TQM_20200815T130004") == want
    with pytest.raises(ValueError):
        normalise_timestamp("last tuesday")


@pytest.mark.parametrize("use_metadata", [True, False])
def test_a_shard_that_does_not_open_is_reported_and_the_rest_still_lists(sources, tmp_path, use_metadata):
    import shutil

    root = tmp_path / "cut"
    shutil.copytree(sources[0], root)
    shard = root / "Core-S2L2A" / "images" / "part_00002.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])  # a download cut short
    src = MajorTOMSource(root, use_metadata=use_metadata)
    refs = src.list_cells()
    assert len(refs) == 4 and all("part_00001" in r.path for r in refs)
    assert src.unreadable and all("part_00002.parquet does not open" in u["reason"] for u in src.unreadable)
    if use_metadata:  # the metadata says which cells were in it
        assert len(src.unreadable) == N_CELLS - 4 + len(FAULTS["duplicates"])
        in_shard_2 = list(range(4, N_CELLS)) + FAULTS["duplicates"]  # the duplicate row sits there too
        assert {u["grid_cell"] for u in src.unreadable} == {cell_spec(i, SEED).grid_cell for i in in_shard_2}
