"""Data never trains silently corrupt (issue 14, item 3): every start verifies the chunk files against the
manifest (size, then checksum), spread over the ranks; a bad chunk stops the run before its first step or, with
data.on_bad_chunk=skip, is left out and counted; a failed read names the chunk file, the cell and the fix; the
fix the messages give really repairs the set.

Damage is made the way disks and copies make it: bytes flipped inside one HDF5 tile of pixels (the file keeps its
size), a file cut short, and tiles whose compressed bytes no longer decode (HDF5's "filter returned failure").
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (the Blosc filter of the chunks)
import pytest
import torch

from phileo.config import ConfigError, apply_overrides
from phileo.data import PretrainDataset, load_manifest
from phileo.data import chunk_format as fmt
from phileo.data import integrity
from phileo.data.chunk_format import BadChunkError, ChunkReadError
from phileo.train.config import PretrainConfig, build_config
from phileo.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
STEPS = 2


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """8 synthetic cells in 4 chunks of 2, assignment for 2 nodes (converted once; tests damage copies)."""
    from phileo.data.synthetic import make_pretrain_shards

    return make_pretrain_shards(tmp_path_factory.mktemp("verify_data"), n_cells=8, nodes=2)


@pytest.fixture
def shards(pristine, tmp_path) -> Path:
    """A copy of the converted set to damage (its plan still points at the generated source, for repairs)."""
    out = tmp_path / "shards"
    shutil.copytree(pristine, out)
    return out


def tiles(path: Path, dataset: str, row: int) -> list:
    """HDF5 storage records (byte_offset, size, ...) of every tile of one cell (row) of a pixel dataset."""
    with h5py.File(path, "r") as f:
        d = f[dataset]
        infos = [d.id.get_chunk_info(i) for i in range(d.id.get_num_chunks())]
    return [t for t in infos if t.chunk_offset[0] == row]


def flip_pixel_bytes(path: Path, row: int = 1, n: int = 64) -> None:
    """Inverts `n` bytes in the middle of the first bands_10m tile of cell `row`: same size, and the Blosc
    stream still decodes (measured here: every patch still reads, 64 bytes of pixels silently differ)."""
    t = tiles(path, fmt.BANDS[10], row)[0]
    with open(path, "r+b") as fh:
        fh.seek(t.byte_offset + t.size // 2)
        data = fh.read(n)
        fh.seek(t.byte_offset + t.size // 2)
        fh.write(bytes(b ^ 0xFF for b in data))


def break_tiles(path: Path, row: int) -> None:
    """Overwrites the Blosc header of every bands_10m tile of cell `row`: any read of that cell fails in HDF5's
    filter (the crash issue 14 describes)."""
    with open(path, "r+b") as fh:
        for t in tiles(path, fmt.BANDS[10], row):
            fh.seek(t.byte_offset)
            fh.write(b"\xff" * 16)


def grid_cells(path: Path) -> list[str]:
    with h5py.File(path, "r") as f:
        return [s.decode() for s in f[fmt.GRID_CELL][...]]


def pretrain_config(run_dir: Path, shards: Path, *extra: str) -> PretrainConfig:
    """A tiny real pretraining on CPU: phileo_vit_tiny at 64 px, 2 steps, logged every step."""
    return apply_overrides(PretrainConfig(), [
        "model.name=phileo_vit_tiny", "model.overrides={img_size: 64}", "data.patch_size=64",
        f"data.root={shards}", "data.batch_size=2", "data.num_workers=0", f"train.steps={STEPS}",
        "train.precision=fp32", "train.device=cpu", "optim.warmup_steps=1", "run.log_every_steps=1",
        "run.image_every_steps=0", f"checkpoint.every_steps={STEPS}", f"run.dir={run_dir}", *extra])


class RecordingTask:
    """FoundationTask that keeps the dataset it trained on (what the run read, to assert on)."""

    def __new__(cls, cfg):
        from phileo.train.pretrain import FoundationTask

        class _Task(FoundationTask):
            def train_dataset(self, info):
                self.dataset = super().train_dataset(info)
                return self.dataset

        return _Task(cfg)


def fit(cfg: PretrainConfig):
    from phileo.train.dist import DistInfo
    from phileo.train.engine import Trainer

    task = RecordingTask(cfg)
    return Trainer(cfg, task, DistInfo()).fit(), task


# --------------------------------------------------------------------------------------------- (a) stop
def test_flipped_pixel_bytes_stop_the_run_before_its_first_step(shards, tmp_path):
    m = load_manifest(shards)
    bad = m.chunks[1]
    flip_pixel_bytes(m.chunk_path(bad))
    assert m.chunk_path(bad).stat().st_size == bad.bytes  # same size: only the checksum can see it
    run = tmp_path / "run"
    with pytest.raises(BadChunkError) as err:
        fit(pretrain_config(run, shards))
    msg = str(err.value)
    assert err.value.paths == (bad.path,)
    assert pickle.loads(pickle.dumps(err.value)).paths == (bad.path,)  # crosses processes whole
    assert str(m.chunk_path(bad)) in msg and "checksum differs" in msg and "training stopped" in msg
    for cell in grid_cells(m.chunk_path(bad)):  # the file's metadata still reads: its cells are named
        assert cell in msg
    assert f"python preprocess/majortom_to_h5.py --verify --out {shards}" in msg
    assert f"rm -f {shards}/chunks/chunk_00001.h5 {shards}/chunks/chunk_00001.json" in msg
    assert "data.on_bad_chunk=skip" in msg
    # Nothing was trained: no step logged, no checkpoint, and log.txt holds the reason.
    assert not read_metrics(run) and not list(run.glob("checkpoints/step_*"))
    log = (run / "log.txt").read_text()
    assert "BadChunkError" in log and str(m.chunk_path(bad)) in log


# --------------------------------------------------------------------------------------------- (b) skip
def test_skip_trains_without_the_bad_chunk_and_counts_it(shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    m = load_manifest(shards)
    bad = m.chunks[1]
    bad_cells = set(grid_cells(m.chunk_path(bad)))
    flip_pixel_bytes(m.chunk_path(bad))
    run = tmp_path / "run"
    result, task = fit(pretrain_config(run, shards, "data.on_bad_chunk=skip"))
    assert result.status == "completed" and result.step == STEPS
    ds = task.dataset  # node 0 of 1: the whole set but the bad chunk
    assert [c.index for c in ds.excluded_chunks] == [bad.index]
    assert bad.index not in {c.index for c in ds.chunks} and ds.num_cells == m.num_cells - bad.n_cells
    assert not bad_cells & set(ds._grid_cell.tolist())
    assert {ds[i]["grid_cell"] for i in range(len(ds))}.isdisjoint(bad_cells)
    log = (run / "log.txt").read_text()
    assert f"leaving out bad chunk {m.chunk_path(bad)}" in log and "1 bad chunk(s) left out" in log
    assert all(cell in log for cell in bad_cells)
    assert read_metrics(run)[0]["data/bad_chunks"] == 1.0 and read_metrics(run)[STEPS]["loss/total"] > 0
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("data/bad_chunks")] == [(0, 1.0)]


def test_a_clean_set_logs_zero_bad_chunks_and_verification_can_be_turned_off(shards, tmp_path):
    result, _ = fit(pretrain_config(tmp_path / "on", shards, "train.steps=1"))
    assert result.status == "completed"
    assert read_metrics(tmp_path / "on")[0]["data/bad_chunks"] == 0.0
    assert "all match" in (tmp_path / "on" / "log.txt").read_text()
    flip_pixel_bytes(load_manifest(shards).chunk_path(load_manifest(shards).chunks[0]))
    result, _ = fit(pretrain_config(tmp_path / "off", shards, "train.steps=1", "data.verify_chunks=false"))
    assert result.status == "completed"  # not verified: the flipped bytes go unseen, as the knob documents
    assert "data/bad_chunks" not in read_metrics(tmp_path / "off").get(0, {})
    assert "not verified at start" in (tmp_path / "off" / "log.txt").read_text()


def test_skip_is_refused_when_a_node_would_have_no_chunk(shards, tmp_path):
    from phileo.data import assign_chunks
    from phileo.train.dist import DistInfo
    from phileo.train.pretrain import FoundationTask

    m = load_manifest(shards)
    node1 = assign_chunks(m, 2)[1]
    for c in node1:
        flip_pixel_bytes(m.chunk_path(c))
    task = FoundationTask(pretrain_config(tmp_path / "run", shards, "data.on_bad_chunk=skip"))
    # One process standing for a 2-node job (no process group: it verifies every chunk itself).
    with pytest.raises(BadChunkError, match="node\\(s\\) 1 of 2 would have no chunk left"):
        task.prepare_data(DistInfo(global_rank=0, world_size=1, node_rank=0, num_nodes=2))
    # Node 0 alone could skip nothing (none of its chunks is bad); the dataset refuses an empty share too.
    with pytest.raises(ValueError, match="node 1 of 2 has no chunk left"):
        PretrainDataset(shards, node_rank=1, num_nodes=2, exclude_chunks=[c.index for c in node1])


def test_config_refuses_an_unknown_bad_chunk_policy():
    with pytest.raises(ConfigError, match="on_bad_chunk"):
        build_config(PretrainConfig, overrides=["data.on_bad_chunk=ignore"])


# ------------------------------------------------------------------------------------- (c) truncated
def test_a_truncated_chunk_is_caught_by_the_size_check(shards, monkeypatch):
    m = load_manifest(shards)
    c = m.chunks[2]
    with open(m.chunk_path(c), "r+b") as fh:
        fh.truncate(c.bytes - 4096)
    # The size check decides alone: the file of the wrong size is never hashed (the others are).
    from phileo.data import manifest as manifest_mod

    hashed = []
    real = manifest_mod.checksum_matches
    monkeypatch.setattr(manifest_mod, "checksum_matches", lambda path, checksum: hashed.append(path) or
                        real(path, checksum))
    bad = integrity.find_bad_chunks(m)
    assert bad == {c.index: f"{c.bytes - 4096} bytes, the manifest says {c.bytes} (truncated)"}
    assert sorted(hashed) == sorted(m.chunk_path(o) for o in m.chunks if o is not c)
    err = integrity.bad_chunk_error(m, bad)
    assert str(m.chunk_path(c)) in str(err) and "truncated" in str(err)
    # A truncated HDF5 file does not open; its cells then come from plan.parquet.
    plan_cells, where = integrity.chunk_cells(m, c)
    assert where.startswith("planned") and len(plan_cells) == c.n_cells and plan_cells[0] in str(err)


def test_a_missing_or_unreadable_chunk_and_standalone_verification(shards, monkeypatch):
    import errno

    from phileo.data import manifest as manifest_mod

    m = load_manifest(shards)
    m.chunk_path(m.chunks[3]).unlink()
    assert integrity.find_bad_chunks(m, threads=1) == {3: "missing"}
    # A read error is reported like any problem (every rank must reach the exchange), not raised on one rank.
    real = manifest_mod.checksum_matches

    def eio(path, checksum):
        if path == m.chunk_path(m.chunks[0]):
            raise OSError(errno.EIO, "Input/output error")
        return real(path, checksum)

    with monkeypatch.context() as patch:
        patch.setattr(manifest_mod, "checksum_matches", eio)
        assert integrity.find_bad_chunks(m) == {0: "unreadable (OSError: [Errno 5] Input/output error)",
                                                3: "missing"}
        # Only an I/O error: a later start may read it (a file server failing over), so the job is retried;
        # a missing or changed file is final.
        assert integrity.bad_chunk_error(m, integrity.find_bad_chunks(m, m.chunks[:1])).retryable
        assert not integrity.bad_chunk_error(m, integrity.find_bad_chunks(m)).retryable
    assert integrity.find_bad_chunks(m, m.chunks[:3]) == {}
    # PretrainDataset on its own verifies its node's chunks when asked (the trainer does it for a job).
    node = next(n for n in range(2) if 3 in {c.index for c in m.assign(2)[n]})
    with pytest.raises(BadChunkError, match="chunk_00003.h5: missing"):
        PretrainDataset(shards, node_rank=node, num_nodes=2, verify=True)


# ---------------------------------------------------------------------------------- (d) read failure
def test_a_read_failure_names_the_chunk_file_the_cell_and_the_fix(shards):
    m = load_manifest(shards)
    c = m.chunks[1]
    cells = grid_cells(m.chunk_path(c))
    break_tiles(m.chunk_path(c), row=1)
    ds = PretrainDataset(shards, patch_size=64)  # not verified: the damage is found by the read
    items = [i for i in range(len(ds)) if ds._chunk_of[ds._items[i]] == ds.chunks.index(c)
             and ds._row_of[ds._items[i]] == 1]
    assert len(items) == 1
    with pytest.raises(ChunkReadError) as err:
        ds[items[0]]
    msg = str(err.value)
    assert isinstance(err.value, OSError) and not isinstance(err.value, BadChunkError)  # worth a retry
    assert err.value.path == str(m.chunk_path(c))
    assert f"cell {cells[1]} (row 1) of chunk file {m.chunk_path(c)}" in msg
    assert "filter returned failure" in msg  # the original HDF5 error
    assert f"--verify --out {shards}" in msg and "If it names this chunk, re-convert it" in msg
    assert f"rm -f {shards}/chunks/chunk_00001.h5" in msg
    ds[[i for i in range(len(ds)) if i != items[0]][0]]  # the other cells still read
    # The same error, message intact, through a DataLoader worker process.
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, items), batch_size=1, num_workers=1)
    with pytest.raises(ChunkReadError, match=f"cell {cells[1]} \\(row 1\\)"):
        next(iter(loader))


def test_an_unreadable_chunk_at_construction_names_the_file(shards):
    m = load_manifest(shards)
    c = m.chunks[0]
    with open(m.chunk_path(c), "r+b") as fh:  # the superblock: HDF5 cannot open the file at all
        fh.write(b"\0" * 64)
    with pytest.raises(ChunkReadError, match=f"the cell metadata of chunk file {m.chunk_path(c)}"):
        PretrainDataset(shards)


# ----------------------------------------------------------------------------------------- (e) repair
def _run_commands(commands: list[str]) -> None:
    # `python` in the commands is this interpreter (the project's environment), as for a user who activated it.
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    for command in commands:
        r = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True)
        assert r.returncode == 0, f"{command}\n{r.stdout}\n{r.stderr}"


def _commands_in(message: str) -> list[str]:
    """The indented command lines that follow 'Re-convert …:' in a message."""
    lines = message.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(("Re-convert", "If it names")))
    return [line.strip() for line in lines[start + 1:] if line.startswith("  ")]


def test_the_reconversion_in_the_message_repairs_the_set(shards, tmp_path):
    m = load_manifest(shards)
    manifest_before = json.loads((shards / fmt.MANIFEST_NAME).read_text())
    flip_pixel_bytes(m.chunk_path(m.chunks[1]))
    with pytest.raises(BadChunkError) as err:
        fit(pretrain_config(tmp_path / "run", shards))
    commands = _commands_in(str(err.value))
    assert commands == [f"rm -f {shards}/chunks/chunk_00001.h5 {shards}/chunks/chunk_00001.json",
                        f"python preprocess/majortom_to_h5.py --out {shards} --nodes 2"]
    _run_commands(commands)
    assert integrity.find_bad_chunks(load_manifest(shards)) == {}
    # Conversion is deterministic: the repaired set is the one the manifest described (same checksums).
    after = json.loads((shards / fmt.MANIFEST_NAME).read_text())
    assert after["chunks"] == manifest_before["chunks"] and after["assignment"] == manifest_before["assignment"]
    result, _ = fit(pretrain_config(tmp_path / "again", shards, "train.steps=1"))
    assert result.status == "completed" and read_metrics(tmp_path / "again")[0]["data/bad_chunks"] == 0.0


def test_the_repair_of_an_array_converted_set_reruns_its_task_and_merges(shards):
    from phileo.data.convert import convert_task
    from phileo.data.merge import merge
    from phileo.data.plan import ConvertConfig, read_plan

    # Make the set array-converted (2 tasks): every chunk exists, so the tasks reuse them and write parts.
    (shards / fmt.PARTS_DIR / fmt.part_name(0, 1)).unlink()
    plan = read_plan(shards)
    for t in range(2):
        convert_task(ConvertConfig(source=None, out=shards, task_index=t, num_tasks=2, progress=False), plan)
    merge(shards, nodes=2)
    m = load_manifest(shards)
    assert integrity.conversion_tasks(shards) == 2
    broken = m.chunks[3]  # chunks 2-3 are task 1's
    break_tiles(m.chunk_path(broken), row=0)
    r = subprocess.run([sys.executable, "preprocess/majortom_to_h5.py", "--verify", "--out", str(shards)], cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"1 of 4 chunk file(s) differ" in r.stdout and str(m.chunk_path(broken)) in r.stdout
    commands = _commands_in(r.stdout)
    assert commands[1:] == [f"python preprocess/majortom_to_h5.py --out {shards} --task-index 1 --num-tasks 2",
                            f"python preprocess/majortom_to_h5.py --out {shards} --nodes 2 --merge"]
    _run_commands(commands)
    r = subprocess.run([sys.executable, "preprocess/majortom_to_h5.py", "--verify", "--out", str(shards)], cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert r.returncode == 0 and "all 4 chunk checksums match" in r.stdout, r.stdout + r.stderr


def test_content_flags_reproduce_the_plan_arguments():
    from phileo.data import cli
    from phileo.data.plan import ConvertConfig, content_flags

    cfg = ConvertConfig(source=None, out=Path("o"), bands=("B02", "B03", "B04", "B08"), patch_size=64,
                        max_patch_nodata=0.2, max_cloud_cover=50.0, sample=10, sample_seed=3, compression="gzip",
                        use_metadata=False, layout="tree")
    flags = content_flags(cfg.content_fingerprint())
    assert content_flags(ConvertConfig(source=None, out=Path("o")).content_fingerprint()) == []
    again = cli.config_from_args(cli.build_parser().parse_args(["--out", "o", *flags]))
    assert again.content_fingerprint() == cfg.content_fingerprint()


# --------------------------------------------------------------------------------------------- the CLIs
@pytest.mark.slow
def test_pretrain_command_line_exits_with_the_bad_chunk_message(shards, tmp_path):
    m = load_manifest(shards)
    flip_pixel_bytes(m.chunk_path(m.chunks[2]))
    cfg = pretrain_config(tmp_path / "run", shards)
    args = [f"{k}={v}" for k, v in (("model.name", cfg.model.name), ("data.root", shards), ("train.device", "cpu"),
                                    ("run.dir", tmp_path / "run"), ("train.steps", 1))]
    r = subprocess.run([sys.executable, "-m", "phileo.train.pretrain", *args], cwd=REPO, capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert r.returncode == 1
    assert "BadChunkError" in r.stderr and str(m.chunk_path(m.chunks[2])) in r.stderr
    assert "--verify --out" in r.stderr and not (tmp_path / "run" / "DONE").exists()


# ------------------------------------------------------------------------------------ (f) two ranks
def _rank_worker() -> None:
    """One rank (argv: shards run_dir out_dir): records which chunks it verified, then runs the pretraining;
    writes the BadChunkError message it ended with."""
    shards, run_dir, out = (Path(a) for a in sys.argv[1:4])
    from phileo.data import manifest as manifest_mod
    from phileo.train.pretrain import run_pretraining

    rank = int(os.environ["RANK"])
    checked = []
    real = manifest_mod.chunk_problem

    def recording(m, chunk):
        checked.append(chunk.index)
        return real(m, chunk)

    integrity.chunk_problem = recording
    try:
        run_pretraining(pretrain_config(run_dir, shards))
        message = "no error"
    except BadChunkError as e:
        message = str(e)
    (out / f"rank{rank}.json").write_text(json.dumps({"checked": checked, "message": message}))


@pytest.mark.slow
def test_two_ranks_verify_disjoint_shares_and_agree_on_the_bad_chunk(shards, tmp_path):
    from phileo.train.dist import free_port

    m = load_manifest(shards)
    bad = m.chunks[1]  # in rank 1's share: rank 0 learns of it only through the exchange
    flip_pixel_bytes(m.chunk_path(bad))
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
               "GROUP_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
        procs.append(subprocess.Popen([sys.executable, "-c", "import test_data_verify as t; t._rank_worker()",
                                       str(shards), str(tmp_path / "run"), str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    shares = [set(r["checked"]) for r in ranks]
    assert shares[0].isdisjoint(shares[1]) and shares[0] | shares[1] == {c.index for c in m.chunks}
    assert sorted(map(len, shares)) == [2, 2] and bad.index in shares[1]
    assert ranks[0]["message"] == ranks[1]["message"] and str(m.chunk_path(bad)) in ranks[0]["message"]
    assert not read_metrics(tmp_path / "run")
