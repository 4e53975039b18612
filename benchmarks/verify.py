#!/usr/bin/env python
"""Benchmark of chunk verification (issue 14: data never trains silently corrupt), side by side with baselines.

    python benchmarks/verify.py [--copies 16] [--repeats 3] [--startups 3] [--json verify.json]

(a) Verification rate: `phileo.data.integrity.find_bad_chunks` (size check, then crc32 of every byte, on 1, 2
    and 4 threads) over a set of real chunk files, against the baseline of reading the same bytes on the same
    threads without checksumming them. Once from the page cache (CPU-bound: what crc32 costs) and once with the
    files evicted from it first (posix_fadvise DONTNEED: read from this machine's disk). The set: the chunks
    of make_pretrain_shards(8 cells), copied --copies times under new indices with a manifest listing them all.
(b) Start-up cost: a pretraining launch in this process (Trainer.fit of a 1-step run on the set of (a): manifest,
    verification, the node's dataset opening every chunk, model, first step, checkpoint) with
    data.verify_chunks=true vs false, alternating, --startups times each after one untimed warm-up; the set is
    evicted from the page cache before each launch, as a job's start finds it on a cluster. Medians; the ratio
    and the seconds verification adds. Interpreter start, imports and srun are not in it (they add to both).

Prints Markdown tables and writes the figures as JSON (--json). One process; OMP_NUM_THREADS=1, torch 1 thread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from phileo.data import chunk_format as fmt  # noqa: E402
from phileo.data.integrity import VERIFY_THREADS, find_bad_chunks  # noqa: E402
from phileo.data.manifest import Manifest, load_manifest  # noqa: E402
from phileo.fsutil import atomic_write_json  # noqa: E402

THREADS = (1, 2, VERIFY_THREADS)
NODE_SHARE_TB = 1.44  # Core-S2L2A converted (~23 TB) over 16 nodes, README "Getting MajorTOM"


def replicated_set(shards: Path, out: Path, copies: int) -> Manifest:
    """`out`: the chunk files of `shards` copied `copies` times under new indices, with a manifest listing them
    all (real chunk bytes and checksums; what verification reads is the same as in a converted set)."""
    doc = json.loads((shards / fmt.MANIFEST_NAME).read_text())
    (out / fmt.CHUNKS_DIR).mkdir(parents=True, exist_ok=True)
    chunks = []
    for k in range(copies):
        for c in doc["chunks"]:
            index = len(chunks)
            shutil.copyfile(shards / c["path"], out / fmt.chunk_relpath(index))
            chunks.append({**c, "index": index, "path": fmt.chunk_relpath(index)})
    atomic_write_json(out / fmt.MANIFEST_NAME, {**doc, "chunks": chunks})
    return load_manifest(out)


def evict(m: Manifest) -> None:
    """Drops the set's files from the page cache (clean pages only; nothing else on the machine is touched)."""
    for c in m.chunks:
        fd = os.open(m.chunk_path(c), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def plain_read(m: Manifest, threads: int) -> None:
    """The baseline: read every byte of every chunk, as file_digest does (1 MiB reused buffer), no checksum."""
    def read(c):
        buf = bytearray(1 << 20)
        with open(m.chunk_path(c), "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read, m.chunks))


def verify(m: Manifest, threads: int) -> None:
    bad = find_bad_chunks(m, threads=threads)
    assert not bad, bad


def rates(m: Manifest, repeats: int) -> dict[str, float]:
    """GB/s of verification and of the plain read, warm and cold, per thread count: best of `repeats`
    interleaved passes (verify, read, verify, read …), so both sides see the same machine."""
    gb = sum(c.bytes for c in m.chunks) / 1e9
    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        for cache in ("warm", "cold"):
            for threads in THREADS:
                for name, fn in (("verify", verify), ("read", plain_read)):
                    if cache == "cold":
                        evict(m)
                    else:
                        plain_read(m, 2)  # everything in the page cache
                    t0 = time.perf_counter()
                    fn(m, threads)
                    times.setdefault(f"{name}_{cache}_t{threads}", []).append(time.perf_counter() - t0)
    return {k: gb / min(v) for k, v in times.items()}


def startup(m: Manifest, work: Path, verify_chunks: bool, k: int) -> tuple[float, float]:
    """(wall s of Trainer.fit to a 1-step run's end, s spent in prepare_data) on a fresh run folder, with the
    set of `m` evicted from the page cache first."""
    import torch

    from phileo.config import apply_overrides
    from phileo.train.config import PretrainConfig
    from phileo.train.dist import DistInfo
    from phileo.train.engine import Trainer
    from phileo.train.pretrain import FoundationTask

    torch.set_num_threads(1)
    cfg = apply_overrides(PretrainConfig(), [
        "model.name=phileo_vit_tiny", "model.overrides={img_size: 64}", "data.patch_size=64",
        f"data.root={m.root}", "data.batch_size=2", "data.num_workers=0", "train.steps=1", "train.device=cpu",
        "train.precision=fp32", "run.image_every_steps=0", f"data.verify_chunks={str(verify_chunks).lower()}",
        f"run.dir={work / f'run_{verify_chunks}_{k}'}"])
    task = FoundationTask(cfg)
    spent = []
    prepare = task.prepare_data

    def timed(info):
        t = time.perf_counter()
        out = prepare(info)
        spent.append(time.perf_counter() - t)
        return out

    task.prepare_data = timed
    evict(m)
    t0 = time.perf_counter()
    result = Trainer(cfg, task, DistInfo()).fit()
    elapsed = time.perf_counter() - t0
    assert result.status == "completed", result
    return elapsed, spent[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--copies", type=int, default=16, help="copies of the 4 generated chunks (~58 MB each set)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved passes per measure (best is kept)")
    p.add_argument("--startups", type=int, default=3, help="launches with and without verification (medians)")
    p.add_argument("--workdir", type=Path, default=None, help="where to generate (default: a temp folder)")
    p.add_argument("--json", type=Path, default=None, help="write the figures here as JSON")
    args = p.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="phileo-bench-verify-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        from phileo.data.synthetic import make_pretrain_shards

        shards = make_pretrain_shards(work / "data", n_cells=8, nodes=1)
        m = replicated_set(shards, work / "replicated", args.copies)
        gb = sum(c.bytes for c in m.chunks) / 1e9
        r = rates(m, args.repeats)
        startup(m, work, False, -1)  # warm-up: first model build, lazy imports
        with_v, without_v, prepare_s = [], [], []
        for k in range(args.startups):  # alternating which goes first: on, off, off, on, on, off …
            for verify_chunks in ((True, False) if k % 2 == 0 else (False, True)):
                wall, spent = startup(m, work, verify_chunks, k)
                if verify_chunks:
                    with_v.append(wall)
                    prepare_s.append(spent)
                else:
                    without_v.append(wall)
        res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}",
               "load_average_1min": os.getloadavg()[0], "set_gb": gb, "chunks": len(m.chunks), "rates_gb_s": r,
               "startup_with_s": statistics.median(with_v), "startup_without_s": statistics.median(without_v),
               "prepare_data_s": statistics.median(prepare_s)}
        res["startup_ratio"] = res["startup_with_s"] / res["startup_without_s"]
        print(f"\n(a) {len(m.chunks)} chunk files, {gb:.2f} GB, best of {args.repeats}; {res['machine']}\n")
        print("| threads | verify warm GB/s | read warm GB/s | verify/read | verify cold GB/s | read cold GB/s | "
              "verify/read |")
        print("|---|---|---|---|---|---|---|")
        for t in THREADS:
            vw, rw, vc, rc = (r[f"{n}_{c}_t{t}"] for c in ("warm", "cold") for n in ("verify", "read"))
            print(f"| {t} | {vw:.2f} | {rw:.2f} | {vw / rw:.2f} | {vc:.2f} | {rc:.2f} | {vc / rc:.2f} |")
        print(f"\n(b) in-process launch to the end of a 1-step run on the same {gb:.2f} GB (page cache evicted), "
              f"median of {args.startups}: with verification {res['startup_with_s']:.2f} s, without "
              f"{res['startup_without_s']:.2f} s, ratio {res['startup_ratio']:.2f}; prepare_data itself "
              f"{res['prepare_data_s']:.2f} s ({gb / res['prepare_data_s']:.2f} GB/s)")
        # A rank's VERIFY_THREADS threads on as many free cores: the one-thread (one-core) rate times that.
        per_core = r["verify_warm_t1"]
        res["node_share_s_cpu_bound"] = {n: NODE_SHARE_TB * 1e3 / (n * VERIFY_THREADS * per_core) for n in (1, 4, 8)}
        print(f"\n{NODE_SHARE_TB} TB per node, CPU-bound ({per_core:.2f} GB/s per core, {VERIFY_THREADS} threads "
              f"per rank on free cores): " + ", ".join(f"{n} rank(s) {s:.0f} s" for n, s in
                                                      res["node_share_s_cpu_bound"].items())
              + "; slower when the file system reads less than that per node")
        print(f"load average during the run: {res['load_average_1min']:.1f} on {os.cpu_count()} cores")
        if args.json:
            args.json.write_text(json.dumps(res, indent=2) + "\n")
        return 0
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
