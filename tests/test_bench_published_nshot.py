"""Reading the published PhilEO Bench n-shot selections (phileo-bench/indices/*.json) onto local data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from phileo.bench.finetune import FinetuneConfig, run_finetuning
from phileo.config import apply_overrides
from phileo.bench.data import REGION_BUCKETS, BenchDataError, BenchDataset, nshot_datasets
from phileo.bench.published_nshot import find_published_index, published_nshot_index
from phileo.bench.synthetic import make_bench_data

# The published bucket table (phileo-bench/utils/data_protocol.py, REGIONS_BUCKETS), copied as a fact.
PUBLISHED_BUCKETS = {
    "europe": ["europe", "denmark-1", "denmark-2"],
    "east-africa": ["east-africa", "tanzania-1", "tanzania-2", "tanzania-3", "tanzania-4", "tanzania-5", "uganda-1"],
    "northwest-africa": ["eq-guinea", "ghana-1", "egypt-1", "israel-1", "israel-2", "nigeria", "senegal"],
    "north-america": ["north-america"],
    "south-america": ["south-america"],
    "japan": ["japan"],
}
REGIONS = ("europe", "denmark-1", "nigeria", "israel-1", "egypt-1", "japan")


def test_our_bucket_table_is_the_published_one_in_the_published_order():
    assert {b: list(rs) for b, rs in REGION_BUCKETS.items()} == PUBLISHED_BUCKETS
    assert list(REGION_BUCKETS) == list(PUBLISHED_BUCKETS)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    make_bench_data(root, regions=REGIONS, train_tiles=2, patches_per_file=5, val_patches_per_file=2,
                    patch_size=32, roads_regions=("europe", "denmark-1", "nigeria", "israel-1", "egypt-1"))
    return root


def concatenation(root, subregions, split, task):
    """The published order written out by hand: subregion by subregion, each one's train files sorted."""
    out = []
    for sub in subregions:
        for f in sorted(root.glob(f"{sub}*train_s2.npy")):
            name = f.name.replace("train", split)
            if (root / name.replace("s2", f"label_{task}")).exists():
                out += [(name, r) for r in range(np.load(root / name, mmap_mode="r").shape[0])]
    return out


def write_published(path, root, task, picks):
    """A published-format index choosing `picks[bucket][split]` = positions in the concatenation."""
    doc = {}
    for bucket, by_split in picks.items():
        subs = PUBLISHED_BUCKETS[bucket]
        doc[bucket] = {"train_indices": by_split["train"], "val_indices": by_split["val"],
                       "length_multi_array_train": len(concatenation(root, subs, "train", task)),
                       "length_multi_array_val": len(concatenation(root, subs, "val", task))}
    path.write_text(json.dumps(doc))
    return path


PICKS = {"europe": {"train": [0, 7, 19], "val": [3, 1]}, "northwest-africa": {"train": [12, 2, 29], "val": [0, 5]},
         "japan": {"train": [4, 9], "val": [1]}}


def test_published_indices_map_to_the_files_and_rows_of_the_published_order(bench, tmp_path):
    index = write_published(tmp_path / "indices_17042025_128_10M_roads_3.json", bench, "roads",
                            {b: v for b, v in PICKS.items() if b != "japan"})  # japan has no roads
    doc = published_nshot_index(bench, "roads", 3, index)
    want_train, want_val = [], []
    for bucket in ("europe", "northwest-africa"):
        for split, want in (("train", want_train), ("val", want_val)):
            cat = concatenation(bench, PUBLISHED_BUCKETS[bucket], split, "roads")
            want += [list(cat[k]) for k in PICKS[bucket][split]]
    assert doc["train"] == want_train and doc["val"] == want_val
    assert doc["train"][0][0].startswith("europe_")  # europe first, then denmark-1: the bucket's order, not a-z
    assert any(name.startswith("denmark-1_") for name, _ in doc["train"])
    # The patches read through the dataset are the published file's rows.
    ds = BenchDataset(bench, "roads", doc["train"], normalisation="none")
    name, row = doc["train"][1]
    x, y = ds.read(1)
    np.testing.assert_array_equal(x, np.load(bench / name)[row])
    assert doc["source"]["published_index"].endswith(index.name) and len(doc["source"]["sha256"]) == 64


def test_the_isreal_spelling_of_the_files_is_matched_by_the_lengths(bench, tmp_path):
    root = tmp_path / "isreal"
    root.mkdir()
    for f in bench.glob("*.npy"):  # the published data files spell Israel "isreal"
        (root / f.name.replace("israel-", "isreal-")).symlink_to(f)
    subs_without = [s for s in PUBLISHED_BUCKETS["northwest-africa"] if not s.startswith("israel")]
    for with_israel in (True, False):
        subs = [s.replace("israel", "isreal") for s in PUBLISHED_BUCKETS["northwest-africa"]] if with_israel \
            else subs_without
        n_train = len(concatenation(root, subs, "train", "lc"))
        n_val = len(concatenation(root, subs, "val", "lc"))
        index = tmp_path / f"indices_18042025_128_10M_lc_2_{with_israel}.json"
        index.write_text(json.dumps({"northwest-africa": {"train_indices": [0, n_train - 1], "val_indices": [0],
                                                          "length_multi_array_train": n_train,
                                                          "length_multi_array_val": n_val}}))
        doc = published_nshot_index(root, "lc", 2, index)
        assert doc["source"]["israel_files"].startswith("included" if with_israel else "excluded")
        last = concatenation(root, subs, "train", "lc")[-1]
        assert doc["train"][-1] == list(last)


def test_lengths_that_do_not_match_the_data_are_refused_with_the_counts(bench, tmp_path):
    index = write_published(tmp_path / "indices_17042025_128_10M_lc_3.json", bench, "lc", {"japan": PICKS["japan"]})
    doc = json.loads(index.read_text())
    doc["japan"]["length_multi_array_train"] += 1
    index.write_text(json.dumps(doc))
    with pytest.raises(BenchDataError, match=r"bucket japan was drawn from \d+ train / \d+ val patches, but .* has"):
        published_nshot_index(bench, "lc", 3, index)


def test_an_index_out_of_range_and_a_malformed_file_are_refused(bench, tmp_path):
    index = write_published(tmp_path / "i.json", bench, "lc", {"japan": {"train": [10_000], "val": [0]}})
    with pytest.raises(BenchDataError, match="index 10000 is outside"):
        published_nshot_index(bench, "lc", 3, index)
    (tmp_path / "bad.json").write_text(json.dumps({"japan": {"train_indices": []}}))
    with pytest.raises(BenchDataError, match="not in the published n-shot format"):
        published_nshot_index(bench, "lc", 3, tmp_path / "bad.json")


def test_a_folder_is_searched_as_the_published_code_globs_it(tmp_path):
    (tmp_path / "indices_17042025_128_10M_roads_100.json").write_text("{}")
    assert find_published_index(tmp_path, "roads", 100).name == "indices_17042025_128_10M_roads_100.json"
    with pytest.raises(BenchDataError, match="no published n-shot index for roads n=50"):
        find_published_index(tmp_path, "roads", 50)
    (tmp_path / "indices_16042025_128_10M_roads_100.json").write_text("{}")  # as published: two roads_100 files
    with pytest.raises(BenchDataError, match="several published n-shot indices"):
        find_published_index(tmp_path, "roads", 100)
    with pytest.raises(BenchDataError, match="for roads n=100, but this run is building n=100"):
        find_published_index(tmp_path / "indices_17042025_128_10M_roads_100.json", "building", 100)


def test_fine_tuning_datasets_take_the_published_selection_and_record_it(bench, tmp_path):
    index = write_published(tmp_path / "indices_18042025_128_10M_lc_3.json", bench, "lc", PICKS)
    splits = nshot_datasets(bench, "lc", 3, index_dir=tmp_path / "idx", published_index=tmp_path)
    assert len(splits.train) == sum(len(p["train"]) for p in PICKS.values())
    assert splits.index_path.name == "nshot_lc_n3_published-indices_18042025_128_10M_lc_3.json"
    saved = json.loads(splits.index_path.read_text())
    assert saved["train"] == published_nshot_index(bench, "lc", 3, index)["train"]
    assert len(splits.index_sha256) == 64


@pytest.mark.slow
def test_a_fine_tuning_run_trains_on_the_published_selection_and_records_it(bench, tmp_path):
    index = write_published(tmp_path / "indices_18042025_128_10M_lc_3.json", bench, "lc", PICKS)
    cfg = apply_overrides(FinetuneConfig(), {
        "data.root": str(bench), "data.task": "lc", "data.n_shot": 3, "data.nshot_index": str(index),
        "data.nshot_index_dir": str(tmp_path / "idx"), "data.batch_size": 4, "data.num_workers": 0,
        "model.name": "phileo_cnn_tiny", "model.overrides": {"img_size": 32}, "finetune.max_epochs": 1,
        "finetune.warmup_epochs": 0, "run.dir": str(tmp_path / "run"), "run.tensorboard": False})
    assert run_finetuning(cfg).status == "completed"
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    recorded = json.loads((tmp_path / "idx" / result["nshot_index"]["path"].rsplit("/", 1)[1]).read_text())
    assert result["n_train"] == sum(len(p["train"]) for p in PICKS.values()) == len(recorded["train"])
    assert recorded["source"]["published_index"] == str(index.resolve())
