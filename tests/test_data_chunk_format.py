"""The on-disk chunk format (phileo.data.chunk_format): the layout of a written chunk (schema 2 without auxiliary
rasters is the schema 1 layout; the aux/ datasets are checked in test_data_aux_targets), checksums, and the
patch-validity rule the converter and PretrainDataset share."""

import hashlib
import json
import zlib

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc filter of the chunk files)
import numpy as np
import pytest

from _preprocess_fixtures import converted
from phileo.data import chunk_format as fmt
from phileo.data import load_manifest
from phileo.fsutil import file_digest

# Schema 1 as published chunk files hold it, written out by hand: renaming a dataset or changing a dtype in
# chunk_format without bumping SCHEMA_VERSION fails here (name: dtype, shape after the cell axis; G = 8 for
# 128 px patches).
SCHEMA_1 = {
    "bands_10m": (np.uint16, (4, 1068, 1068)), "bands_20m": (np.uint16, (6, 534, 534)),
    "cloud_mask": (np.uint8, (1068, 1068)), "nodata_count_20m": (np.uint8, (534, 534)),
    "cells/grid_cell": (object, ()), "cells/product_id": (object, ()), "cells/timestamp": (object, ()),
    "cells/crs": (object, ()), "cells/source": (object, ()), "cells/geotransform": (np.float64, (6,)),
    "cells/nodata_fraction": (np.float32, ()), "cells/cloud_fraction": (np.float32, (4,)),
    "cells/n_valid_offsets": (np.int64, ()), "cells/grid_valid": (np.bool_, (8, 8)),
}
SCHEMA_1_ATTRS = {"format", "schema_version", "chunk_index", "plan_fingerprint", "bands_10m", "bands_20m",
                  "bands_60m", "patch_size", "max_patch_nodata", "compression"}


def _datasets(f: h5py.File) -> dict[str, h5py.Dataset]:
    found = {}
    f.visititems(lambda name, obj: found.__setitem__(name, obj) if isinstance(obj, h5py.Dataset) else None)
    return found


def test_a_written_chunk_has_exactly_the_schema_1_layout(tmp_path_factory):
    out = converted(tmp_path_factory, "parquet")
    m = load_manifest(out)
    assert m.raw["format"] == fmt.FORMAT and m.schema_version == fmt.SCHEMA_VERSION == 2
    for c in m.chunks:
        assert c.path == fmt.chunk_relpath(c.index) == f"chunks/chunk_{c.index:05d}.h5"
        assert (out / "chunks" / f"chunk_{c.index:05d}.json").is_file() and fmt.sidecar_name(c.index).endswith(".json")
        with h5py.File(m.chunk_path(c), "r") as f:
            ds = _datasets(f)
            assert set(ds) == set(SCHEMA_1) | {"stats/band_histogram", "report"}
            for name, (dtype, tail) in SCHEMA_1.items():
                assert ds[name].shape == (c.n_cells, *tail), name
                assert ds[name].dtype == dtype or (dtype is object and h5py.check_string_dtype(ds[name].dtype))
            assert ds["stats/band_histogram"].shape == (10, 65536)
            assert json.loads(f["stats"].attrs["bands"]) == m.bands
            assert set(f.attrs) == SCHEMA_1_ATTRS
            assert (f.attrs["format"], f.attrs["chunk_index"]) == (fmt.FORMAT, c.index)
            assert set(json.loads(f["report"].asstr()[()])) == {"rejected", "skipped"}
    parts = sorted(p.name for p in (out / fmt.PARTS_DIR).glob(fmt.PART_GLOB))
    assert parts == [fmt.part_name(0, 1)] == ["task_00000-of-00001.json"]


def test_checksums_are_crc32_by_default_and_sha256_for_older_manifests(tmp_path):
    f = tmp_path / "blob"
    data = np.random.default_rng(0).integers(0, 256, size=(3 << 20) + 17, dtype=np.uint8).tobytes()
    f.write_bytes(data)  # spans several read blocks, the last one partial
    assert fmt.file_checksum(f) == f"crc32:{zlib.crc32(data):08x}"
    assert fmt.file_checksum(f, "sha256") == "sha256:" + hashlib.sha256(data).hexdigest()
    assert file_digest(f, "sha256") == hashlib.sha256(data).hexdigest()  # the one hasher under both
    assert fmt.checksum_matches(f, fmt.file_checksum(f, "sha256")) and fmt.checksum_matches(f, fmt.file_checksum(f))
    assert not fmt.checksum_matches(f, "crc32:00000000") and not fmt.checksum_matches(f, "md4:00")
    with pytest.raises(ValueError, match="unknown checksum"):
        fmt.file_checksum(f, "md4")


@pytest.mark.parametrize("patch_size,max_nodata", [(128, 0.1), (64, 0.0), (256, 0.5)])
def test_valid_offsets_map_equals_counting_every_crop(patch_size, max_nodata):
    rng = np.random.default_rng(patch_size)
    b10 = rng.integers(1, 5000, size=(4, 1068, 1068), dtype=np.uint16)
    b20 = rng.integers(1, 5000, size=(6, 534, 534), dtype=np.uint16)
    b10[:, :300, :200] = 0    # a no-data swath edge at 10 m
    b20[2, 400:, 500:] = 0    # and one 20 m band's corner
    count = fmt.nodata_count_20m(b10, b20)
    nodata10 = (b10 == 0).any(0) | np.repeat(np.repeat((b20 == 0).any(0), 2, 0), 2, 1)
    np.testing.assert_array_equal(count, nodata10.reshape(534, 2, 534, 2).sum(axis=(1, 3)))
    vmap = fmt.valid_offsets_map(count, patch_size, max_nodata)
    n_pos = (1068 - patch_size) // 2 + 1
    assert vmap.shape == (n_pos, n_pos)
    for i, j in rng.integers(n_pos, size=(200, 2)):
        crop = nodata10[2 * i:2 * i + patch_size, 2 * j:2 * j + patch_size]
        assert vmap[i, j] == (crop.sum() <= max_nodata * patch_size * patch_size)
    g = fmt.grid_offsets(patch_size)
    assert list(g) == list(range(0, 1068 - patch_size + 1, patch_size))
    np.testing.assert_array_equal(fmt.grid_valid(vmap, patch_size), vmap[np.ix_(g // 2, g // 2)])
    assert fmt.nodata_count_20m(b10 + 1, b20 + 1) is None and fmt.grid_valid(None, patch_size).all()
