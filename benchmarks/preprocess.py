#!/usr/bin/env python
"""Benchmark of the MajorTOM → HDF5 converter and of reading training patches, side by side, on generated cells.

    python benchmarks/preprocess.py [--cells 12] [--patches 3000] [--workdir DIR]

(a) Converter cells/s with one worker vs the floor: reading each cell's 10 used bands from the same parquet
    shards and decoding them, nothing else. Goal: converter >= 0.8 x floor.
(b) Random 128 px training patches/s from the HDF5 chunks (PretrainDataset, one process) vs the reference way:
    open the cell's GeoTIFFs (unpacked tree), decode the whole bands, upsample the 20 m bands, crop.
    Goals: HDF5 >= 50 x reference and >= 500 patches/s per process.
(c) The cost of the auxiliary targets (--aux-buildings / --aux-landcover, the synthetic global rasters): the
    converter with vs without them (cells/s, CPU and bytes per cell) and patches/s with vs without the targets.

Prints a Markdown table and writes the figures as JSON (--json). Single-threaded numeric libraries throughout
(OMP_NUM_THREADS=1, torch 1 thread) so that "per worker" means one core's worth of numeric work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from phileo.data.convert import convert  # noqa: E402
from phileo.data.plan import ConvertConfig  # noqa: E402
from phileo.data.majortom import BANDS_10M, BANDS_20M, CLOUD_MASK, PHILEO_BANDS, MajorTOMSource, decode_geotiff  # noqa: E402
from phileo.data.synthetic import write_aux_rasters, write_majortom_parquet, write_majortom_tree  # noqa: E402


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (all threads)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def floor_decode(source: Path) -> tuple[float, float, int]:
    """Read each cell's 10 band columns (one row group at a time) and decode them: (wall s, cpu s, cells)."""
    src = MajorTOMSource(source, use_metadata=False)
    refs = src.list_cells()
    seen = set()
    refs = [r for r in refs if not (r.key in seen or seen.add(r.key))]
    t0, c0 = time.perf_counter(), cpu_seconds()
    for ref in refs:
        pf = src._shard(ref.path)
        t = pf.read_row_group(ref.row_group, columns=list(PHILEO_BANDS))
        for b in PHILEO_BANDS:
            decode_geotiff(t.column(b)[ref.row].as_py(), b)
    return time.perf_counter() - t0, cpu_seconds() - c0, len(refs)


def converter(source: Path, out: Path, cells_per_chunk: int, **aux: Path) -> tuple[float, float, int]:
    shutil.rmtree(out, ignore_errors=True)
    t0, c0 = time.perf_counter(), cpu_seconds()
    doc = convert(ConvertConfig(source=source, out=out, nodes=1, workers=1, cells_per_chunk=cells_per_chunk,
                                progress=False, **aux))
    return time.perf_counter() - t0, cpu_seconds() - c0, doc["num_cells"]


def chunk_bytes_per_cell(shards: Path) -> float:
    from phileo.data import load_manifest

    m = load_manifest(shards)
    return sum(c.bytes for c in m.chunks) / sum(c.n_cells for c in m.chunks)


def converter_breakdown(source: Path, work: Path, aux: dict[str, Path]) -> dict[str, float]:
    """CPU ms per cell of the converter's steps beyond the floor, each timed alone on the same cells."""
    import h5py

    from phileo.data import chunk_format as fmt
    from phileo.data.convert import create_pixel_datasets

    src = MajorTOMSource(source, use_metadata=False)
    refs, seen = [], set()
    for r in src.list_cells():
        if r.key not in seen:
            seen.add(r.key)
            refs.append(r)
    cells = [src.read_cell(r) for r in refs]
    cfg = ConvertConfig(source=source, out=work / "breakdown", progress=False)
    stored = cfg.stored_bands
    out: dict[str, float] = {}

    def timed(name, fn):
        c0 = time.process_time()
        fn()
        out[name] = (time.process_time() - c0) / len(cells) * 1e3

    pf = src._shard(refs[0].path)
    timed("decode cloud mask", lambda: [decode_geotiff(src._shard(r.path).read_row_group(
        r.row_group, columns=[CLOUD_MASK]).column(0)[r.row].as_py(), CLOUD_MASK) for r in refs])
    del pf
    b10 = [np.stack([c.bands[b] for b in BANDS_10M]) for c in cells]
    b20 = [np.stack([c.bands[b] for b in BANDS_20M]) for c in cells]
    path = work / "breakdown.h5"

    def write():
        # The converter's own datasets (tiles, filters), so the figure follows any change of the format.
        with h5py.File(path, "w") as f:
            ds = create_pixel_datasets(f, len(cells), stored, cfg.compression)
            for i, c in enumerate(cells):
                ds[fmt.BANDS[10]][i], ds[fmt.BANDS[20]][i], ds[fmt.CLOUD_MASK][i] = b10[i], b20[i], c.cloud_mask

    timed(f"HDF5 write ({cfg.compression})", write)
    timed(f"{fmt.CHECKSUM_ALGORITHM} of the chunk file", lambda: fmt.file_checksum(path))

    def checks():
        for i, c in enumerate(cells):
            count = fmt.nodata_count_20m(b10[i], b20[i])
            fmt.valid_offsets_map(count, 128, 0.1)
            [np.count_nonzero(c.cloud_mask == k) for k in range(4)]
            for band in b10[i]:
                np.bincount(band[::fmt.STATS_ROW_STRIDE_10M].ravel(), minlength=fmt.HISTOGRAM_BINS)
            for band in b20[i]:
                np.bincount(band[::fmt.STATS_ROW_STRIDE_20M].ravel(), minlength=fmt.HISTOGRAM_BINS)

    timed("no-data, validity, cloud fractions, histograms", checks)
    rasters = ConvertConfig(source=source, out=work / "breakdown", progress=False, **aux).aux_rasters()
    for kind, raster in rasters.items():
        raster.sample(cells[0].crs, cells[0].transform)  # open the dataset outside the timing
        timed(f"(c) {kind} raster onto the 20 m grid", lambda r=raster: [r.sample(c.crs, c.transform) for c in cells])

    samples = {k: [r.sample(c.crs, c.transform) for c in cells] for k, r in rasters.items()}

    def write_aux():
        with h5py.File(path, "w") as f:
            ds = create_pixel_datasets(f, len(cells), stored, cfg.compression, aux_targets=tuple(rasters))
            for kind, arrays in samples.items():
                for i, arr in enumerate(arrays):
                    ds[fmt.AUX_DATASETS[kind]][i] = arr

    timed(f"(c) HDF5 write of the aux datasets ({cfg.compression})", write_aux)
    path.unlink()
    return out


def reference_patches(tree: Path, n_patches: int, seed: int = 0) -> tuple[float, int]:
    """PhilEO's original way: per patch open the cell's band GeoTIFFs, decode whole bands, upsample, crop."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    src = MajorTOMSource(tree, layout="tree", use_metadata=False)
    refs = src.list_cells()
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for _ in range(n_patches):
        ref = refs[int(rng.integers(len(refs)))]
        d = Path(ref.path)
        b10 = np.stack([decode_geotiff(d / f"{b}.tif", b)[0] for b in BANDS_10M]).astype(np.float32)
        b20 = np.stack([decode_geotiff(d / f"{b}.tif", b)[0] for b in BANDS_20M]).astype(np.float32)
        mask = decode_geotiff(d / f"{CLOUD_MASK}.tif", CLOUD_MASK)[0]
        up = F.interpolate(torch.from_numpy(b20)[None], scale_factor=2, mode="bilinear", align_corners=False)[0]
        r, c = 2 * rng.integers(471, size=2)
        image = np.concatenate([b10[:, r:r + 128, c:c + 128], up[:, r:r + 128, c:c + 128].numpy()]) / 10000.0
        _ = np.bincount(mask[r:r + 128, c:c + 128].ravel(), minlength=4), image
    return time.perf_counter() - t0, n_patches


def h5_patches(shards: Path, n_patches: int, seed: int = 0) -> tuple[float, int]:
    """Random training patches through PretrainDataset: a fresh epoch (so fresh crops) every len(ds) items."""
    from phileo.data import PretrainDataset

    ds = PretrainDataset(shards, seed=seed)
    order = np.random.default_rng(seed).permutation(n_patches) % len(ds)
    ds[0]  # open the files outside the timing, as a DataLoader worker would have them open
    t0 = time.perf_counter()
    for k, i in enumerate(order):
        if k % len(ds) == 0:
            ds.set_epoch(k // len(ds) + 1)
        item = ds[int(i)]
    elapsed = time.perf_counter() - t0
    assert item["image"].shape == (10, 128, 128)
    ds.close()
    return elapsed, n_patches


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", type=int, default=12, help="generated cells (1068 px, deflate GeoTIFFs)")
    p.add_argument("--patches", type=int, default=3000, help="HDF5 patches to time")
    p.add_argument("--reference-patches", type=int, default=30, help="reference-way patches to time")
    p.add_argument("--repeats", type=int, default=2, help="converter/floor repetitions (best is kept)")
    p.add_argument("--workdir", type=Path, default=None, help="where to generate (default: a temp folder)")
    p.add_argument("--json", type=Path, default=None, help="write the figures here as JSON")
    args = p.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="phileo-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        parquet = work / "parquet"
        tree = work / "tree"
        if not (parquet / "Core-S2L2A").is_dir():
            write_majortom_parquet(parquet, args.cells, seed=0, cells_per_shard=4, compress="deflate")
        if not (tree / "Core-S2L2A").is_dir():
            write_majortom_tree(tree, args.cells, seed=0, compress="deflate")
        aux_paths = parquet / "aux" / "build_4326.tif", parquet / "aux" / "landcover_4326.tif"
        if not all(p.is_file() for p in aux_paths):
            write_aux_rasters(parquet, args.cells, seed=0)
        aux = {"aux_buildings": aux_paths[0], "aux_landcover": aux_paths[1]}
        gen_s = time.perf_counter() - t
        floors, convs, convs_aux = [], [], []
        for _ in range(args.repeats):  # interleaved, so a noisy neighbour hurts both sides alike
            floors.append(floor_decode(parquet))
            # One chunk for all cells: per-chunk costs (file close, checksum, merge) spread over its cells as
            # they do over 256 cells on real data.
            convs.append(converter(parquet, work / "shards", cells_per_chunk=args.cells))
            convs_aux.append(converter(parquet, work / "shards_aux", cells_per_chunk=args.cells, **aux))
        f_wall, f_cpu, n_cells = min(floors)
        c_wall, c_cpu, n_conv = min(convs)
        a_wall, a_cpu, n_aux = min(convs_aux)
        breakdown = converter_breakdown(parquet, work, aux)
        ref_s, ref_n = reference_patches(tree, args.reference_patches)
        h5_s, h5_n = h5_patches(work / "shards", args.patches)
        h5a_s, h5a_n = h5_patches(work / "shards_aux", args.patches)
        res = {
            "cells": n_cells, "generate_s": round(gen_s, 1),
            "floor_cells_per_s": n_cells / f_wall, "floor_cpu_s_per_cell": f_cpu / n_cells,
            "converter_cells_per_s": n_conv / c_wall, "converter_cpu_s_per_cell": c_cpu / n_conv,
            "reference_patches_per_s": ref_n / ref_s, "h5_patches_per_s": h5_n / h5_s,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}",
            "load_average_1min": os.getloadavg()[0],
            "converter_extra_cpu_ms_per_cell": breakdown,
            "aux_converter_cells_per_s": n_aux / a_wall, "aux_converter_cpu_s_per_cell": a_cpu / n_aux,
            "bytes_per_cell": chunk_bytes_per_cell(work / "shards"),
            "aux_bytes_per_cell": chunk_bytes_per_cell(work / "shards_aux"),
            "aux_h5_patches_per_s": h5a_n / h5a_s,
        }
        res["aux_converter_vs_without"] = res["aux_converter_cells_per_s"] / res["converter_cells_per_s"]
        res["aux_cpu_ms_per_cell_added"] = (res["aux_converter_cpu_s_per_cell"] - res["converter_cpu_s_per_cell"]) * 1e3
        res["aux_bytes_vs_without"] = res["aux_bytes_per_cell"] / res["bytes_per_cell"]
        res["aux_patches_vs_without"] = res["aux_h5_patches_per_s"] / res["h5_patches_per_s"]
        res["converter_vs_floor"] = res["converter_cells_per_s"] / res["floor_cells_per_s"]
        res["converter_cpu_vs_floor"] = res["floor_cpu_s_per_cell"] / res["converter_cpu_s_per_cell"]
        res["h5_vs_reference"] = res["h5_patches_per_s"] / res["reference_patches_per_s"]
        goals = {"converter >= 0.8 x floor": res["converter_vs_floor"] >= 0.8,
                 "HDF5 >= 50 x reference": res["h5_vs_reference"] >= 50,
                 "HDF5 >= 500 patches/s per process": res["h5_patches_per_s"] >= 500}
        res["goals_met"] = goals
        print(f"\n{n_cells} generated cells (1068 px, deflate GeoTIFFs), one worker process, {res['machine']}\n")
        print("| measure | this | baseline | ratio | goal |")
        print("|---|---|---|---|---|")
        print(f"| (a) converter vs decode floor, cells/s (wall) | {res['converter_cells_per_s']:.2f} | "
              f"{res['floor_cells_per_s']:.2f} | {res['converter_vs_floor']:.2f} | >= 0.8 |")
        print(f"| (a) same, CPU s per cell (all threads) | {res['converter_cpu_s_per_cell']:.3f} | "
              f"{res['floor_cpu_s_per_cell']:.3f} | {res['converter_cpu_vs_floor']:.2f} | (info) |")
        print(f"| (b) random 128 px patches/s, HDF5 vs reference way | {res['h5_patches_per_s']:.0f} | "
              f"{res['reference_patches_per_s']:.1f} | {res['h5_vs_reference']:.0f} | >= 50, and >= 500/s |")
        print(f"| (c) converter with vs without aux rasters, cells/s (wall) | {res['aux_converter_cells_per_s']:.2f} | "
              f"{res['converter_cells_per_s']:.2f} | {res['aux_converter_vs_without']:.2f} | (report) |")
        print(f"| (c) same, CPU s per cell | {res['aux_converter_cpu_s_per_cell']:.3f} | "
              f"{res['converter_cpu_s_per_cell']:.3f} | +{res['aux_cpu_ms_per_cell_added']:.1f} ms | (report) |")
        print(f"| (c) chunk MB per cell | {res['aux_bytes_per_cell'] / 1e6:.2f} | {res['bytes_per_cell'] / 1e6:.2f} | "
              f"{res['aux_bytes_vs_without']:.2f} | (report) |")
        print(f"| (c) random 128 px patches/s with vs without aux targets | {res['aux_h5_patches_per_s']:.0f} | "
              f"{res['h5_patches_per_s']:.0f} | {res['aux_patches_vs_without']:.2f} | (report) |")
        print("\nconverter CPU beyond the floor, ms per cell: " + ", ".join(
            f"{k} {v:.1f}" for k, v in breakdown.items()))
        print(f"load average during the run: {res['load_average_1min']:.1f} on {os.cpu_count()} cores")
        print("\ngoals: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in goals.items()))
        if args.json:
            args.json.write_text(json.dumps(res, indent=2) + "\n")
        return 0
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
