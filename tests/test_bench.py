"""PhilEO Bench reader and n-shot protocol, on small synthetic data in the published file layout."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest

from phileo.bench import data as bench
from phileo.bench.data import (IGNORE_INDEX, BenchDataError, BenchDataset, load_or_create_nshot_index,
                               scan_bench_files, select_nshot, worldcover_to_class)
from phileo.bench.synthetic import make_bench_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    make_bench_data(root, patches_per_file=8, val_patches_per_file=4, patch_size=16)
    return root


def _write(root, name, arr):
    np.save(root / name, arr)


def _bucket_with_labels(root, region, label_means, split="train", size=8):
    """One file whose patch k has a building label of constant value label_means[k]."""
    n = len(label_means)
    _write(root, f"{region}_1_{split}_s2.npy", np.full((n, size, size, 10), 1000, np.uint16))
    lab = np.stack([np.full((size, size, 1), m, np.float32) for m in label_means])
    _write(root, f"{region}_1_{split}_label_building.npy", lab)


def test_published_layout_is_found_and_checked(data):
    scan = scan_bench_files(data, "building", "train")
    assert len(scan.files) == 7 * 2 and scan.n_patches == 7 * 2 * 8
    assert all(f.patch_size == 16 and f.split == "train" for f in scan.files)
    roads = scan_bench_files(data, "roads", "train")
    # Roads exist only for some regions: japan's files are left out and listed, not silently dropped.
    assert {s["file"] for s in roads.skipped} == {"japan_1_train_s2.npy", "japan_2_train_s2.npy"}
    assert all("label_roads" in s["reason"] for s in roads.skipped)
    assert len(roads.files) == 12


def test_nshot_is_deterministic_and_follows_the_counts(data):
    a = select_nshot(data, "building", 5, seed=3)
    b = select_nshot(data, "building", 5, seed=3)
    assert a == b
    assert select_nshot(data, "building", 5, seed=4)["train"] != a["train"]
    # Six buckets, each with data here: n train and ceil(0.2 n) val per bucket.
    assert sorted(a["buckets"]) == sorted(bench.REGION_BUCKETS)
    for bucket, entry in a["buckets"].items():
        assert entry["train"]["selected"] == 5 and entry["val"]["selected"] == math.ceil(0.2 * 5) == 1
        assert entry["train"]["accepted_by_rule"] + entry["train"]["accepted_by_chance"] \
            + entry["train"]["topped_up"] == 5
    assert len(a["train"]) == 30 and len(a["val"]) == 6
    # Train patches come from train files, validation ones from val files, never twice.
    assert all("_train_s2" in f for f, _ in a["train"]) and all("_val_s2" in f for f, _ in a["val"])
    assert len({tuple(s) for s in a["train"]}) == 30
    # Each bucket draws only from its own regions.
    for f, _ in a["train"]:
        region = bench.parse_s2_name(f)[0]
        assert region in bench.REGION_BUCKETS[bench.BUCKET_OF_REGION[region]]


def test_nshot_selections_are_nested_in_n(data):
    small = select_nshot(data, "lc", 2, seed=5)
    large = select_nshot(data, "lc", 6, seed=5)
    for bucket in bench.REGION_BUCKETS:
        pick = lambda doc: [tuple(s) for s in doc["train"] if bench.BUCKET_OF_REGION[bench.parse_s2_name(s[0])[0]] == bucket]
        assert pick(large)[:2] == pick(small)


def test_acceptance_rule_for_density_tasks(tmp_path):
    # north-america: 200 empty and 200 well-covered patches. Empty ones are kept with probability 0.25, so about
    # 0.25 / 1.25 = 20 % of the selection is empty (seeded: exact count fixed, range wide enough for any seed).
    _bucket_with_labels(tmp_path, "north-america", [0.0] * 200 + [0.5] * 200)
    _bucket_with_labels(tmp_path, "north-america", [0.5] * 10, split="val")
    doc = select_nshot(tmp_path, "building", 100, seed=1)
    empties = sum(1 for _, i in doc["train"] if i < 200)
    stats = doc["buckets"]["north-america"]["train"]
    assert stats["accepted_by_chance"] == empties and stats["accepted_by_rule"] == 100 - empties
    assert 8 <= empties <= 35, empties
    # Land cover has no rule: about half the picks are "empty" patches.
    lc = np.full((400, 8, 8, 1), 10, np.uint8)
    _write(tmp_path, "north-america_1_train_label_lc.npy", lc)
    _write(tmp_path, "north-america_1_val_label_lc.npy", lc[:10])
    lc_doc = select_nshot(tmp_path, "lc", 100, seed=1)
    assert 35 <= sum(1 for _, i in lc_doc["train"] if i < 200) <= 65


def test_train_and_val_thresholds_differ(tmp_path):
    # Mean label 0.007: above the train threshold (0.005), below the validation one (0.01).
    _bucket_with_labels(tmp_path, "japan", [0.007] * 40)
    _bucket_with_labels(tmp_path, "japan", [0.007] * 40, split="val")
    doc = select_nshot(tmp_path, "building", 20, seed=0)
    stats = doc["buckets"]["japan"]
    assert stats["train"]["accepted_by_rule"] == 20
    assert stats["val"]["accepted_by_rule"] == 0 and stats["val"]["selected"] == 4


def test_short_buckets_are_topped_up_or_give_all(tmp_path):
    _bucket_with_labels(tmp_path, "japan", [0.0] * 6)
    _bucket_with_labels(tmp_path, "japan", [0.0] * 2, split="val")
    doc = select_nshot(tmp_path, "building", 6, seed=0)
    train = doc["buckets"]["japan"]["train"]
    assert train["selected"] == 6 and train["topped_up"] == 6 - train["accepted_by_chance"] > 0
    val = doc["buckets"]["japan"]["val"]
    assert val["requested"] == 2 and val["selected"] == 2
    big = select_nshot(tmp_path, "building", 50, seed=0)["buckets"]["japan"]["train"]
    assert big["requested"] == 50 and big["selected"] == big["available"] == 6


def test_index_is_saved_next_to_the_data_and_reused(data, tmp_path):
    path, doc = load_or_create_nshot_index(data, "roads", 3, seed=11)
    assert path == data / "nshot_indices" / "nshot_roads_n3_seed11.json"
    assert json.loads(path.read_text()) == doc
    stamp = path.stat().st_mtime_ns
    path2, doc2 = load_or_create_nshot_index(data, "roads", 3, seed=11)
    assert path2 == path and doc2 == doc and path.stat().st_mtime_ns == stamp
    # Another folder for read-only data, and an index made for other parameters is refused by name.
    other, _ = load_or_create_nshot_index(data, "roads", 3, seed=11, index_dir=tmp_path / "idx")
    assert other.parent == tmp_path / "idx"
    other.write_text(path.read_text().replace('"n_shot": 3', '"n_shot": 4'))
    with pytest.raises(BenchDataError, match="nshot_roads_n3_seed11.json was drawn for"):
        load_or_create_nshot_index(data, "roads", 3, seed=11, index_dir=tmp_path / "idx")


def test_index_refuses_data_that_changed(tmp_path):
    make_bench_data(tmp_path, regions=["japan"], patches_per_file=4, val_patches_per_file=2, patch_size=8)
    path, _ = load_or_create_nshot_index(tmp_path, "building", 2)
    arr = np.load(tmp_path / "japan_1_train_s2.npy")
    np.save(tmp_path / "japan_1_train_s2.npy", arr[:3])
    np.save(tmp_path / "japan_1_train_label_building.npy", np.load(tmp_path / "japan_1_train_label_building.npy")[:3])
    with pytest.raises(BenchDataError, match="japan_1_train_s2.npy has 3 patches.*data changed"):
        load_or_create_nshot_index(tmp_path, "building", 2)


def test_bad_files_are_named(tmp_path):
    make_bench_data(tmp_path, regions=["japan"], patches_per_file=2, val_patches_per_file=1, patch_size=8)
    np.save(tmp_path / "japan_1_train_label_lc.npy", np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(BenchDataError, match=r"japan_1_train_label_lc.npy: label array has shape \(2, 8, 8\), "
                                             r"expected \(2, 8, 8, 1\)"):
        scan_bench_files(tmp_path, "lc", "train")
    np.save(tmp_path / "japan_2_train_s2.npy", np.zeros((2, 8, 8, 3), np.uint16))
    with pytest.raises(BenchDataError, match=r"japan_2_train_s2.npy: s2 array has shape \(2, 8, 8, 3\)"):
        scan_bench_files(tmp_path, "building", "train")
    (tmp_path / "japan_2_train_s2.npy").write_bytes(b"not numpy")
    with pytest.raises(BenchDataError, match="japan_2_train_s2.npy is not a readable .npy"):
        scan_bench_files(tmp_path, "building", "train")
    (tmp_path / "japan_2_train_s2.npy").unlink()
    np.save(tmp_path / "atlantis_1_train_s2.npy", np.zeros((1, 8, 8, 10), np.uint16))
    with pytest.raises(BenchDataError, match="atlantis_1_train_s2.npy: not a PhilEO Bench file name"):
        scan_bench_files(tmp_path, "building", "train")
    with pytest.raises(BenchDataError, match="data folder not found"):
        scan_bench_files(tmp_path / "nope", "building", "train")
    ds = BenchDataset(tmp_path, "roads", [("japan_1_train_s2.npy", 0)])
    with pytest.raises(BenchDataError, match="missing roads label array: .*japan_1_train_label_roads.npy"):
        ds[0]


def test_israel_spelling_of_the_reference_is_accepted():
    assert bench.parse_s2_name("isreal-1_7_test_s2.npy") == ("israel-1", "7", "test")
    assert bench.parse_s2_name("europe_12_val_s2.npy") == ("europe", "12", "val")
    assert bench.parse_s2_name("europe_12_val_label_lc.npy") is None


def test_worldcover_codes_map_to_class_indices():
    codes = np.array([[10, 20, 30, 40, 50, 60], [70, 80, 90, 95, 100, 0]], np.uint8)
    assert worldcover_to_class(codes).tolist() == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, IGNORE_INDEX]]
    assert worldcover_to_class(np.array([255, 15, 1000], np.uint16)).tolist() == [IGNORE_INDEX] * 3
    assert worldcover_to_class(np.array([95.0, 95.5])).tolist() == [9, IGNORE_INDEX]


def test_dataset_items_and_normalisations(data):
    doc = select_nshot(data, "lc", 2)
    ds = BenchDataset(data, "lc", doc["train"])
    x, y = ds[0]["image"], ds[0]["label"]
    raw_x, raw_y = ds.read(0)
    assert x.shape == (10, 16, 16) and str(x.dtype) == "torch.float32"
    np.testing.assert_allclose(x.numpy(), raw_x.transpose(2, 0, 1) / 10000.0, rtol=1e-6)
    assert y.shape == (16, 16) and str(y.dtype) == "torch.int64"
    assert y.numpy().tolist() == worldcover_to_class(raw_y[..., 0]).tolist()
    xs = BenchDataset(data, "lc", doc["train"], normalisation="standardise")[0]["image"]
    np.testing.assert_allclose(xs.numpy()[:, 3, 5], (raw_x[3, 5] - bench.BAND_MEAN) / bench.BAND_STD, rtol=1e-5)
    yr = BenchDataset(data, "building", doc["train"])[0]["label"]
    assert yr.shape == (1, 16, 16) and str(yr.dtype) == "torch.float32"
    # A pickled dataset (DataLoader workers) carries paths, not the memory-mapped arrays.
    ds.read(1)
    assert ds._arrays and pickle.loads(pickle.dumps(ds))._arrays == {}
    with pytest.raises(BenchDataError, match="unknown normalisation"):
        BenchDataset(data, "lc", doc["train"], normalisation="minmax")


def test_augmentation_moves_image_and_label_together(data):
    ds = BenchDataset(data, "building", [("europe_1_train_s2.npy", 0)], normalisation="none", augment=True)
    raw_x, raw_y = ds.read(0)
    import torch
    torch.manual_seed(0)
    seen = set()
    for _ in range(12):
        item = ds[0]
        x, y = item["image"], item["label"]
        # The label must be the same transform of the raw label as x is of the raw image: find it by search.
        matches = [(k, f) for k in range(4) for f in (False, True)
                   if np.array_equal(_tf(raw_x.transpose(2, 0, 1), k, f), x.numpy())]
        assert matches
        k, f = matches[0]
        np.testing.assert_array_equal(_tf(raw_y.transpose(2, 0, 1), k, f), y.numpy())
        seen.add((k, f))
    assert len(seen) > 1


def _tf(a, k, flip):
    a = np.rot90(a, k, axes=(-2, -1))
    return a[..., ::-1] if flip else a


def test_full_test_set(data):
    ds = BenchDataset.test_set(data, "roads")
    assert len(ds) == 6 * 8  # one test tile (0) per region with roads, 8 patches each
    assert {s["file"] for s in ds.skipped} == {"japan_0_test_s2.npy"}
    assert len(BenchDataset.test_set(data, "lc")) == 7 * 8
    splits = bench.nshot_datasets(data, "building", 2, seed=2)
    assert len(splits.train) == 12 and len(splits.val) == 6 and len(splits.test) == 56
    assert splits.index_sha256 == bench.file_sha256(splits.index_path) and len(splits.index_sha256) == 64


def test_cli_draws_indices_ahead_and_scans(data, tmp_path, capsys):
    assert bench.main(["nshot", str(data), "--tasks", "lc", "--n-shots", "2", "3", "--index-dir",
                       str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nshot_lc_n2_seed97.json", "nshot_lc_n3_seed97.json"]
    # What the CLI drew is what a run later loads.
    path, doc = load_or_create_nshot_index(data, "lc", 2, index_dir=tmp_path)
    assert doc == select_nshot(data, "lc", 2)
    assert bench.main(["scan", str(data)]) == 0
    assert "roads     train    12 files       96 patches  (2 skipped" in capsys.readouterr().out
    assert bench.main(["scan", str(tmp_path / "missing")]) == 2
