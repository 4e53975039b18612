"""PretrainDataset: exact patches, targets and coordinates; deterministic crops; the no-data rule; node split."""

import math
import pickle

import numpy as np
import pytest
import torch
from rasterio.warp import transform

from _preprocess_fixtures import GOOD, SEED, converted, source_cells
from phileo.data import PretrainDataset, load_manifest
from phileo.data.majortom import BANDS_10M, BANDS_20M
from phileo.data.pretrain import upsample2_bilinear
from phileo.data.synthetic import cell_spec, make_pretrain_shards, reference_image


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return converted(tmp_path_factory, "parquet")


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    return source_cells(tmp_path_factory)


_masks = {}


def _nodata_fraction(cell, r, c, p):
    """No-data share of a window, from the source bands: 0 in any 10 m band or any 20 m band's footprint."""
    if id(cell) not in _masks:
        nd10 = np.stack([cell.bands[b] == 0 for b in BANDS_10M]).any(0)
        nd20 = np.stack([cell.bands[b] == 0 for b in BANDS_20M]).any(0).repeat(2, 0).repeat(2, 1)
        _masks[id(cell)] = nd10 | nd20
    return _masks[id(cell)][r:r + p, c:c + p].mean()


def test_items_are_exact_crops_with_their_targets(shards, cells):
    ds = PretrainDataset(shards, seed=5)
    assert len(ds) == len(GOOD) == ds.num_cells
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            assert set(item) == {"image", "coords", "lat", "lon", "cloud_fraction", "grid_cell", "product_id",
                                 "window", "buildings", "buildings_weight", "landcover", "landcover_weight"}
            assert item["buildings_weight"] == item["landcover_weight"] == 0.0  # converted without aux rasters
            assert item["image"].dtype == np.float32 and item["image"].shape == (10, 128, 128)
            cell = cells[(item["grid_cell"], item["product_id"])]
            r, c = (int(v) for v in item["window"])
            assert r % 2 == 0 and c % 2 == 0 and 0 <= r <= 1068 - 128 and 0 <= c <= 1068 - 128
            # The whole cell as PhilEO serves it (20 m bands upsampled whole, by torch), then cropped.
            np.testing.assert_allclose(item["image"], reference_image(cell.bands)[:, r:r + 128, c:c + 128],
                                       rtol=0, atol=1e-6)
            mask = cell.cloud_mask[r:r + 128, c:c + 128]
            np.testing.assert_allclose(item["cloud_fraction"], np.bincount(mask.ravel(), minlength=4)[:4] / 128**2,
                                       atol=1e-6)
            x0, dx, _, y0, _, dy = cell.transform
            lon, lat = transform(cell.crs, "EPSG:4326", [x0 + (c + 64) * dx], [y0 + (r + 64) * dy])
            assert item["lat"] == pytest.approx(lat[0], abs=1e-7) and item["lon"] == pytest.approx(lon[0], abs=1e-7)
            la, lo = (item["lat"] + 90) / 180 * 2 * math.pi, (item["lon"] + 180) / 360 * 2 * math.pi
            want = (np.array([math.sin(la), math.cos(la), math.sin(lo), math.cos(lo)]) + 1) / 2
            np.testing.assert_allclose(item["coords"], want, atol=1e-6)
            assert item["coords"].dtype == np.float32 and item["cloud_fraction"].dtype == np.float32


def test_crops_are_a_pure_function_of_seed_epoch_and_index(shards):
    a, b = PretrainDataset(shards, seed=1), PretrainDataset(shards, seed=1)
    windows = {}
    for epoch in range(6):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        for i in range(len(a)):
            w = tuple(a[i]["window"])
            assert w == tuple(b[len(b) - 1 - (len(b) - 1 - i)]["window"])
            windows.setdefault(i, set()).add(w)
    a.set_epoch(0)
    b.set_epoch(3)
    b.set_epoch(0)  # going back reproduces the epoch exactly (a resumed run)
    assert [tuple(a[i]["window"]) for i in range(len(a))] == [tuple(b[i]["window"]) for i in range(len(b))]
    assert all(len(w) >= 5 for w in windows.values())  # new crops each epoch
    other = PretrainDataset(shards, seed=2)
    assert [tuple(other[i]["window"]) for i in range(len(a))] != [tuple(a[i]["window"]) for i in range(len(a))]


def test_patches_over_the_nodata_limit_are_never_served(shards, cells):
    ds = PretrainDataset(shards, seed=0)
    edge_cells = {cell_spec(i, SEED).grid_cell for i in (1, 4)}
    items = [i for i in range(len(ds)) if ds[i]["grid_cell"] in edge_cells]
    assert len(items) == 2
    rng = np.random.default_rng(0)
    for i in items:
        cell = cells[(ds[i]["grid_cell"], ds[i]["product_id"])]
        # The rule has teeth here: a uniform draw would often give a patch with too much no-data.
        uniform = [_nodata_fraction(cell, *(2 * rng.integers(471, size=2)), 128) for _ in range(400)]
        assert np.sum(np.array(uniform) > 0.1) >= 10
        for epoch in range(150):
            ds.set_epoch(epoch)
            r, c = ds.crop_offset(i)[1:]
            assert _nodata_fraction(cell, r, c, 128) <= 0.1


def test_fixed_grid_enumerates_every_valid_patch_once(shards, cells):
    ds = PretrainDataset(shards, random_crop=False)
    seen = {}
    for i in range(len(ds)):
        item = ds[i]
        r, c = (int(v) for v in item["window"])
        assert r % 128 == 0 and c % 128 == 0
        key = (item["grid_cell"], r, c)
        assert key not in seen
        seen[key] = item
    expected = set()
    for (gc, pid), cell in cells.items():
        if gc not in {cell_spec(i, SEED).grid_cell for i in GOOD}:
            continue
        for r in range(0, 1068 - 127, 128):
            for c in range(0, 1068 - 127, 128):
                if _nodata_fraction(cell, r, c, 128) <= 0.1:
                    expected.add((gc, r, c))
    assert set(seen) == expected and len(ds) == len(expected) < len(GOOD) * 64
    item = ds[len(ds) // 2]
    cell = cells[(item["grid_cell"], item["product_id"])]
    r, c = item["window"]
    np.testing.assert_allclose(item["image"], reference_image(cell.bands)[:, r:r + 128, c:c + 128], atol=1e-6)


def test_each_node_reads_only_its_chunks_and_nodes_cover_every_cell_once(shards):
    m = load_manifest(shards)
    for num_nodes in (1, 2, len(m.chunks)):
        per_node = [PretrainDataset(shards, node_rank=k, num_nodes=num_nodes) for k in range(num_nodes)]
        names = [{ds[i]["grid_cell"] for i in range(len(ds))} for ds in per_node]
        assert sum(len(n) for n in names) == len(set().union(*names)) == m.num_cells
        for ds in per_node:
            assert all(c in m.assign(num_nodes)[ds.node_rank] for c in ds.chunks)
    with pytest.raises(ValueError, match=f"among {len(m.chunks) + 1} nodes"):
        PretrainDataset(shards, node_rank=0, num_nodes=len(m.chunks) + 1)
    with pytest.raises(ValueError, match="node_rank"):
        PretrainDataset(shards, node_rank=2, num_nodes=2)
    with pytest.raises(ValueError, match="even"):
        PretrainDataset(shards, patch_size=127)


def test_dataloader_workers_open_files_lazily_and_match_the_main_process(shards):
    ds = PretrainDataset(shards, seed=3)
    ds[0]  # the main process has handles open before the workers fork
    pickle.loads(pickle.dumps(ds))  # handles are not pickled
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, shuffle=False)
    batches = list(loader)
    assert batches[0]["image"].shape == (2, 10, 128, 128) and batches[0]["window"].shape == (2, 2)
    assert batches[0]["coords"].shape == (2, 4) and isinstance(batches[0]["grid_cell"], list)
    got = torch.cat([b["image"] for b in batches])
    want = torch.stack([torch.from_numpy(ds[i]["image"]) for i in range(len(ds))])
    assert torch.equal(got, want)
    ds.close()
    assert ds._files == {}


def test_another_patch_size_keeps_the_rules(shards, cells):
    ds = PretrainDataset(shards, patch_size=64, seed=4)
    for epoch in range(20):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            r, c = (int(v) for v in item["window"])
            cell = cells[(item["grid_cell"], item["product_id"])]
            assert item["image"].shape == (10, 64, 64) and _nodata_fraction(cell, r, c, 64) <= 0.1
            if epoch == 0:
                np.testing.assert_allclose(item["image"], reference_image(cell.bands)[:, r:r + 64, c:c + 64],
                                           atol=1e-6)
    grid = PretrainDataset(shards, patch_size=256, random_crop=False)
    assert all(int(grid[i]["window"][0]) % 256 == 0 for i in range(len(grid)))


def test_upsampling_matches_torch_bilinear():
    a = np.random.default_rng(0).integers(0, 10000, (3, 17, 23)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(a)[None], scale_factor=2, mode="bilinear",
                                           align_corners=False)[0].numpy()
    np.testing.assert_allclose(upsample2_bilinear(a), want, rtol=1e-6)


def test_make_pretrain_shards_gives_a_ready_folder(tmp_path):
    root = make_pretrain_shards(tmp_path, n_cells=3, nodes=3, seed=9)
    m = load_manifest(root)
    assert m.num_cells == 3 and m.assignment["num_nodes"] == 3
    assert all(len(PretrainDataset(root, node_rank=k, num_nodes=3)) == 1 for k in range(3))
    stamp = (root / "manifest.json").stat().st_mtime_ns
    assert make_pretrain_shards(tmp_path, n_cells=3, nodes=3, seed=9) == root
    assert (root / "manifest.json").stat().st_mtime_ns == stamp  # reused
    make_pretrain_shards(tmp_path, n_cells=2, nodes=1, seed=9)
    assert load_manifest(root).num_cells == 2  # other arguments: regenerated
