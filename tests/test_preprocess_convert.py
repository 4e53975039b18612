"""The converter (plan, convert, merge, CLI): chunk contents, manifest, faults, duplicates, resume after a kill,
array tasks + merge. The chunk format's own rules and names: test_data_chunk_format.py."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc filter of the chunk files)
import numpy as np
import pytest

from _preprocess_fixtures import FAULTS, GOOD, N_CELLS, SEED, converted, parquet_source, source_cells
from phileo.data import assign_chunks, chunk_format as fmt, cli, load_manifest
from phileo.data import convert as conv
from phileo.data.convert import convert, convert_task
from phileo.data.manifest import verify_chunks
from phileo.data.merge import merge
from phileo.data.plan import ConvertConfig
from phileo.data.majortom import BANDS_10M, BANDS_20M, PHILEO_BANDS
from phileo.data.synthetic import cell_spec

REPO = Path(__file__).resolve().parents[1]


def _cells_in(out: Path) -> dict[tuple[str, str], tuple[str, int]]:
    """(grid_cell, product_id) → (chunk path, row) over every chunk of a manifest; fails on a repeat."""
    m = load_manifest(out)
    found = {}
    for c in m.chunks:
        with h5py.File(m.chunk_path(c), "r") as f:
            for row, (gc, pid) in enumerate(zip(f[fmt.GRID_CELL].asstr()[...], f[fmt.PRODUCT_ID].asstr()[...])):
                assert (gc, pid) not in found, f"{gc} written twice"
                found[(gc, pid)] = (c.path, row)
    return found


def _good_keys():
    return {(cell_spec(i, SEED).grid_cell, cell_spec(i, SEED).product_id) for i in GOOD}


@pytest.mark.parametrize("layout", ["parquet", "tree"])
def test_every_good_cell_is_written_once_and_faults_are_listed(tmp_path_factory, layout):
    out = converted(tmp_path_factory, layout)
    m = load_manifest(out)
    assert set(_cells_in(out)) == _good_keys()
    assert m.num_cells == len(GOOD) == m.raw["num_cells"]
    reasons = {r["grid_cell"]: r["reason"] for r in m.rejected}
    assert set(reasons) == {cell_spec(FAULTS[k][0], SEED).grid_cell
                            for k in ("truncated", "missing_band", "wrong_size")}
    assert "does not decode" in reasons[cell_spec(5, SEED).grid_cell]
    assert "B8A" in reasons[cell_spec(6, SEED).grid_cell]
    assert "533×534" in reasons[cell_spec(7, SEED).grid_cell]
    assert all(r["source"] for r in m.rejected)
    if layout == "parquet":  # the tree lists the duplicate through its metadata as well
        assert [d["grid_cell"] for d in m.duplicates] == [cell_spec(1, SEED).grid_cell]
    assert m.counts["duplicates"] == 1 and m.counts["rejected"] == 3 and m.counts["converted"] == len(GOOD)


def test_both_layouts_convert_to_identical_pixels(tmp_path_factory):
    a, b = converted(tmp_path_factory, "parquet"), converted(tmp_path_factory, "tree")
    ca, cb = _cells_in(a), _cells_in(b)
    assert set(ca) == set(cb)
    for key in ca:
        with h5py.File(a / ca[key][0], "r") as fa, h5py.File(b / cb[key][0], "r") as fb:
            ra, rb = ca[key][1], cb[key][1]
            for name in (fmt.BANDS[10], fmt.BANDS[20], fmt.CLOUD_MASK, fmt.NODATA_COUNT_20M):
                np.testing.assert_array_equal(fa[name][ra], fb[name][rb])
            np.testing.assert_array_equal(fa[fmt.GEOTRANSFORM][ra], fb[fmt.GEOTRANSFORM][rb])


def test_chunks_hold_the_source_cells_at_native_resolution(tmp_path_factory):
    out = converted(tmp_path_factory, "parquet")
    cells = source_cells(tmp_path_factory)
    for key, (path, row) in _cells_in(out).items():
        cell = cells[key]
        with h5py.File(out / path, "r") as f:
            assert f[fmt.BANDS[10]].shape[1:] == (4, 1068, 1068) and f[fmt.BANDS[10]].dtype == np.uint16
            assert f[fmt.BANDS[20]].shape[1:] == (6, 534, 534)
            np.testing.assert_array_equal(f[fmt.BANDS[10]][row], np.stack([cell.bands[b] for b in BANDS_10M]))
            np.testing.assert_array_equal(f[fmt.BANDS[20]][row], np.stack([cell.bands[b] for b in BANDS_20M]))
            np.testing.assert_array_equal(f[fmt.CLOUD_MASK][row], cell.cloud_mask)
            assert f[fmt.CRS].asstr()[row] == cell.crs and f[fmt.TIMESTAMP].asstr()[row] == cell.timestamp
            assert tuple(f[fmt.GEOTRANSFORM][row]) == cell.transform
            # No-data: a 10 m pixel that is 0 in any band (20 m bands counted over their 2x2 footprint).
            nd10 = np.stack([cell.bands[b] == 0 for b in BANDS_10M]).any(0)
            nd20 = np.stack([cell.bands[b] == 0 for b in BANDS_20M]).any(0).repeat(2, 0).repeat(2, 1)
            expected = (nd10 | nd20).mean()
            assert f[fmt.NODATA_FRACTION][row] == pytest.approx(expected, abs=1e-6)
            assert f[fmt.NODATA_COUNT_20M][row].sum() / 1068**2 == pytest.approx(expected, abs=1e-6)
            frac = np.bincount(cell.cloud_mask.ravel(), minlength=4)[:4] / cell.cloud_mask.size
            np.testing.assert_allclose(f[fmt.CLOUD_FRACTION][row], frac, atol=1e-6)
            assert f.attrs[fmt.ATTR_SCHEMA_VERSION] == fmt.SCHEMA_VERSION and json.loads(f.attrs[fmt.ATTR_BANDS[10]]) == list(BANDS_10M)


def test_manifest_describes_chunks_nodes_and_statistics(tmp_path_factory):
    out = converted(tmp_path_factory, "parquet")
    m = load_manifest(out)
    assert m.bands == list(PHILEO_BANDS) and m.schema_version == fmt.SCHEMA_VERSION
    assert m.patch_size == 128 and m.max_patch_nodata == 0.1
    assert "10000" in m.raw["normalisation"]["served"]
    for c in m.chunks:
        assert c.checksum == f"crc32:{zlib.crc32(m.chunk_path(c).read_bytes()):08x}"
        assert c.n_cells >= 1 and m.chunk_path(c).stat().st_size == c.bytes
    nodes = m.assignment["nodes"]
    assert m.assignment["num_nodes"] == 2 and sorted(sum(nodes, [])) == [c.index for c in m.chunks]
    assert [[c.index for c in n] for n in assign_chunks(m, 2)] == nodes  # stored == recomputed
    # Statistics: close to the mean/std over every valid pixel of the source cells (they sample 1 row in 8).
    cells = [source_cells(tmp_path_factory)[k] for k in _good_keys()]
    for j, band in enumerate(m.stats["bands"]):
        px = np.concatenate([c.bands[band][c.bands[band] > 0].ravel() for c in cells]).astype(np.float64) / 1e4
        assert m.stats["mean"][j] == pytest.approx(px.mean(), rel=0.03)
        assert m.stats["std"][j] == pytest.approx(px.std(), rel=0.05)
        assert m.stats["p01"][j] == pytest.approx(np.percentile(px, 1), rel=0.1)
        assert m.stats["p99"][j] == pytest.approx(np.percentile(px, 99), rel=0.05)


def test_killed_run_resumes_without_losing_or_duplicating_a_cell(tmp_path_factory, tmp_path, monkeypatch):
    src = parquet_source(tmp_path_factory)
    cfg = ConvertConfig(source=src, out=tmp_path / "out", nodes=1, cells_per_chunk=2, progress=False)
    real = conv._write_cell
    written = []

    def dying(*a, **kw):
        if len(written) == 3:  # the middle of the second chunk
            raise KeyboardInterrupt("killed")
        written.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(conv, "_write_cell", dying)
    with pytest.raises(KeyboardInterrupt):
        convert(cfg)
    chunks = tmp_path / "out" / "chunks"
    assert sorted(p.name for p in chunks.glob("chunk_*.h5")) == ["chunk_00000.h5"]  # only complete ones visible
    assert not (tmp_path / "out" / "manifest.json").exists()
    first = (chunks / "chunk_00000.h5").stat()
    monkeypatch.setattr(conv, "_write_cell", real)
    convert(cfg)
    assert set(_cells_in(tmp_path / "out")) == _good_keys()
    again = (chunks / "chunk_00000.h5").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # reused, not redone
    # Killed between a chunk's rename and its sidecar: the sidecar is rebuilt from the chunk, not redone.
    sidecar = json.loads((chunks / "chunk_00000.json").read_text())
    (chunks / "chunk_00000.json").unlink()
    convert(cfg)
    assert json.loads((chunks / "chunk_00000.json").read_text())["checksum"] == sidecar["checksum"]
    assert (chunks / "chunk_00000.h5").stat().st_ino == first.st_ino


@pytest.mark.slow
def test_sigkilled_cli_run_leaves_only_complete_chunks_and_resumes(tmp_path_factory, tmp_path):
    src = parquet_source(tmp_path_factory)
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "preprocess" / "majortom_to_h5.py"), "--source", str(src), "--out", str(out),
           "--cells-per-chunk", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not list((out / "chunks").glob("chunk_*.json")) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    for h5 in (out / "chunks").glob("chunk_*.h5"):
        with h5py.File(h5, "r") as f:  # every visible chunk is complete
            assert fmt.REPORT in f and f[fmt.GRID_CELL].shape[0] == f[fmt.BANDS[10]].shape[0]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert set(_cells_in(out)) == _good_keys()
    assert not list((out / "chunks").glob(".*.tmp"))


def test_array_tasks_then_merge_equal_a_single_run(tmp_path_factory, tmp_path):
    src = parquet_source(tmp_path_factory)
    out = tmp_path / "array"
    for t in (2, 0):  # out of order, as SLURM may run them
        convert_task(ConvertConfig(source=src, out=out, cells_per_chunk=2, task_index=t, num_tasks=3, progress=False))
    with pytest.raises(ValueError, match=r"--num-tasks 3: task\(s\) 1 "):
        merge(out, nodes=2)
    assert not (out / "manifest.json").exists()
    convert_task(ConvertConfig(source=src, out=out, cells_per_chunk=2, task_index=1, num_tasks=3, progress=False))
    assert sorted(p.name for p in (out / "parts").iterdir()) == [f"task_0000{i}-of-00003.json" for i in range(3)]
    doc = merge(out, nodes=2)
    single = load_manifest(converted(tmp_path_factory, "parquet"))
    assert set(_cells_in(out)) == _good_keys()
    assert [c["n_cells"] for c in doc["chunks"]] == [c.n_cells for c in single.chunks]
    assert doc["stats"]["mean"] == single.stats["mean"]
    assert len(doc["rejected"]) == 3


def test_other_arguments_on_the_same_output_are_refused(tmp_path_factory, tmp_path):
    src = parquet_source(tmp_path_factory)
    convert(ConvertConfig(source=src, out=tmp_path / "o", limit=2, progress=False))
    with pytest.raises(ValueError, match="limit: 2 there, 3 now"):
        convert(ConvertConfig(source=src, out=tmp_path / "o", limit=3, progress=False))
    # The same arguments again: nothing to do, same manifest.
    before = json.loads((tmp_path / "o" / "manifest.json").read_text())["chunks"]
    convert(ConvertConfig(source=src, out=tmp_path / "o", limit=2, progress=False))
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["chunks"] == before


def test_thresholds_and_trial_selection(tmp_path_factory, tmp_path):
    src = parquet_source(tmp_path_factory)
    doc = convert(ConvertConfig(source=src, out=tmp_path / "clear", max_cloud_cover=0.0, progress=False))
    cloudy = [s for s in doc["skipped"] if "cloud cover" in s["reason"]]
    assert cloudy and doc["num_cells"] + len(doc["skipped"]) == len(GOOD)
    doc = convert(ConvertConfig(source=src, out=tmp_path / "nodata", max_cell_nodata=0.01, progress=False))
    assert {s["grid_cell"] for s in doc["skipped"]} == {cell_spec(i, SEED).grid_cell for i in (1, 4)}
    doc = convert(ConvertConfig(source=src, out=tmp_path / "sample", sample=3, sample_seed=1, progress=False))
    assert doc["counts"]["planned"] == 3
    with pytest.raises(ValueError, match="either limit"):
        ConvertConfig(source=src, out=tmp_path / "x", limit=1, sample=1)
    with pytest.raises(ValueError, match="unknown band"):
        ConvertConfig(source=src, out=tmp_path / "x", bands=("B02", "B13"))


def test_assign_chunks_balances_cells_deterministically():
    chunks = [{"n_cells": n} for n in (256, 256, 256, 200, 256, 17, 256, 90, 256, 256)]
    for nodes in range(1, len(chunks) + 1):
        split = assign_chunks(chunks, nodes)
        loads = [sum(c["n_cells"] for c in node) for node in split]
        assert sum(loads) == sum(c["n_cells"] for c in chunks) and all(node for node in split)
        assert max(loads) <= sum(loads) / nodes + 256  # within one chunk of an even split
        assert split == assign_chunks(list(chunks), nodes)
    # 3 nodes: seven chunks of 256 force some node to hold 3 x 256 = 768 cells; nobody should hold more.
    assert max(sum(c["n_cells"] for c in n) for n in assign_chunks(chunks, 3)) == 768
    with pytest.raises(ValueError, match="cannot split 10 chunk"):
        assign_chunks(chunks, 11)


def test_load_manifest_errors_name_the_file_and_the_fix(tmp_path, tmp_path_factory):
    with pytest.raises(FileNotFoundError, match=r"manifest.json not found.*majortom_to_h5.py"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_manifest(tmp_path)
    doc = json.loads((converted(tmp_path_factory, "parquet") / "manifest.json").read_text())
    doc["schema_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="schema_version 99.*re-convert"):
        load_manifest(tmp_path)
    del doc["chunks"]
    doc["schema_version"] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="incomplete or malformed"):
        load_manifest(tmp_path)


def test_array_task_index_comes_from_slurm_variables():
    args = cli.build_parser().parse_args(["--source", "s", "--out", "o", "--array"])
    cfg = cli.config_from_args(args, {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "4",
                                       "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_MAX": "8"})
    assert (cfg.task_index, cfg.num_tasks) == (2, 4)
    with pytest.raises(ValueError, match="SLURM_ARRAY_TASK_ID"):
        cli.config_from_args(args, {})
    # A re-submitted subset (--array=17,40) is not a range: its ids are indices only with --num-tasks.
    subset = {"SLURM_ARRAY_TASK_ID": "40", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "17",
              "SLURM_ARRAY_TASK_MAX": "40"}
    with pytest.raises(ValueError, match="add --num-tasks"):
        cli.config_from_args(args, subset)
    args = cli.build_parser().parse_args(["--source", "s", "--out", "o", "--array", "--num-tasks", "64"])
    cfg = cli.config_from_args(args, subset)
    assert (cfg.task_index, cfg.num_tasks) == (40, 64)


@pytest.mark.slow
def test_verify_accepts_crc32_and_older_sha256_manifests_and_names_a_changed_chunk(tmp_path_factory, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(converted(tmp_path_factory, "parquet"), out)
    assert verify_chunks(out) == []
    doc = json.loads((out / "manifest.json").read_text())
    first = doc["chunks"][0]
    first["checksum"] = fmt.file_checksum(out / first["path"], "sha256")  # as an older converter wrote it
    (out / "manifest.json").write_text(json.dumps(doc))
    assert verify_chunks(out) == []
    with open(out / first["path"], "r+b") as fh:  # one flipped byte, same size
        fh.seek(fh.seek(0, 2) // 2)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 1]))
    assert verify_chunks(out) == [first["path"]]


def test_cli_with_workers_then_array_and_merge(tmp_path_factory, tmp_path):
    src = parquet_source(tmp_path_factory)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = str(REPO / "preprocess" / "majortom_to_h5.py")
    res = subprocess.run([sys.executable, script, "--source", str(src), "--out", str(tmp_path / "local"),
                          "--nodes", "2", "--workers", "2", "--cells-per-chunk", "2", "--no-progress"],
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert set(_cells_in(tmp_path / "local")) == _good_keys()
    out = tmp_path / "array"
    base = [sys.executable, script, "--source", str(src), "--out", str(out), "--cells-per-chunk", "3"]
    for task in ("0", "1"):
        r = subprocess.run(base + ["--array", "--num-tasks", "2", "--no-progress"], capture_output=True,
                           text=True, env={**env, "SLURM_ARRAY_TASK_ID": task})
        assert r.returncode == 0, r.stderr
        assert not (out / "manifest.json").exists()
    r = subprocess.run([sys.executable, script, "--out", str(out), "--nodes", "2", "--merge"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "5 cells" in r.stdout and set(_cells_in(out)) == _good_keys()
    r = subprocess.run([sys.executable, script, "--out", str(out), "--verify"], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0 and "match" in r.stdout
    r = subprocess.run([sys.executable, script, "--out", str(tmp_path / "nothing"), "--merge"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "plan.json not found" in r.stderr


def test_an_unreadable_shard_is_listed_in_rejected_and_the_rest_converts(tmp_path_factory, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(parquet_source(tmp_path_factory), src)
    shard = src / "Core-S2L2A" / "images" / "part_00002.parquet"
    shard.write_bytes(shard.read_bytes()[:1000])
    doc = convert(ConvertConfig(source=src, out=tmp_path / "out", progress=False))
    assert doc["num_cells"] == 4  # cells 0-3, all in the first shard
    cut = [r for r in doc["rejected"] if "does not open" in r["reason"]]
    assert {r["grid_cell"] for r in cut} >= {cell_spec(i, SEED).grid_cell for i in range(4, N_CELLS)}
    assert doc["counts"]["unreadable_at_listing"] == len(cut)
