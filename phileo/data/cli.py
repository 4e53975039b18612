"""The converter's command line (preprocess/majortom_to_h5.py is a thin wrapper around `main`).

    python preprocess/majortom_to_h5.py --source DIR --out DIR --nodes N [--workers K]    plan, convert, merge
    ... --plan-only | --array [--num-tasks N] | --task-index i --num-tasks N | --merge | --verify

One SLURM array task per disjoint slice of the chunks (`--array`), then one `--merge`; see README.md,
"Preprocessing MajorTOM". Exit status: 0 done, 1 a bad chunk (--verify: size or checksum), 2 bad input (the
message says which flag or file and what to do).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from phileo.data.chunk_format import COMPRESSIONS, MANIFEST_NAME, PARTS_DIR, PLAN_JSON, part_name
from phileo.data.convert import convert_task
from phileo.data.majortom import PHILEO_BANDS
from phileo.data.integrity import describe_bad_chunks, find_bad_chunks, repair_text
from phileo.data.manifest import load_manifest
from phileo.data.merge import merge
from phileo.data.plan import CHUNKS_PER_NODE_TARGET, DEFAULT_CELLS_PER_CHUNK, ConvertConfig, load_or_make_plan


def build_parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="majortom_to_h5.py",
        description="Convert MajorTOM Core-S2L2A / FastTOM (parquet shards or the unpacked tree, auto-detected) "
                    "into HDF5 chunk files and OUT/manifest.json for PhilEO pretraining. Locally: one command. "
                    "On SLURM: an array of tasks with --array (each converts a disjoint slice), then --merge.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", type=Path, help="folder holding Core-S2L2A/ (or FastTOM's folder), or that folder")
    p.add_argument("--out", type=Path, required=True, help="output folder (chunks/, manifest.json)")
    p.add_argument("--nodes", type=int, default=1, help="training nodes the manifest's assignment is made for "
                   "(any other count up to the number of chunks works at training time)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes; each decodes on two threads while it writes on a third (about two "
                        "cores' worth when free), so about half the cores is a good number")
    g = p.add_argument_group("input")
    g.add_argument("--layout", choices=["parquet", "tree"], default=None, help="force a layout (default: detect)")
    g.add_argument("--no-metadata", action="store_true",
                   help="list cells from the shards/tree themselves even when metadata.parquet is present")
    g.add_argument("--bands", default=",".join(PHILEO_BANDS),
                   help="comma-separated bands to store (B01 and B09 are 60 m and unused by PhilEO)")
    g.add_argument("--limit", type=int, default=None, help="convert only the first N cells (trial run)")
    g.add_argument("--sample", type=int, default=None, help="convert N cells drawn at random (trial run)")
    g.add_argument("--sample-seed", type=int, default=0)
    g.add_argument("--aux-buildings", type=Path, default=None, metavar="RASTER",
                   help="global building-percent raster (0-100; GeoTIFF or VRT, any CRS, e.g. build_4326.tif): "
                        "stored per cell on its 20 m grid for the buildings pretraining target")
    g.add_argument("--aux-landcover", type=Path, default=None, metavar="RASTER",
                   help="global ESA WorldCover raster (codes 10-100, 0 = no-data; GeoTIFF or VRT, any CRS, e.g. "
                        "landcover_4326.tif): stored per cell on its 20 m grid for the land-cover target")
    g = p.add_argument_group("thresholds")
    g.add_argument("--patch-size", type=int, default=128, help="training patch size the validity maps are for")
    g.add_argument("--max-patch-nodata", type=float, default=0.1,
                   help="patches with a larger no-data fraction are never served (PhilEO Bench's rule)")
    g.add_argument("--max-cell-nodata", type=float, default=1.0,
                   help="skip cells with a larger no-data fraction (cells without any servable patch are "
                        "always skipped)")
    g.add_argument("--max-cloud-cover", type=float, default=100.0,
                   help="skip cells with more thick+thin cloud (percent of valid pixels)")
    g = p.add_argument_group("output")
    g.add_argument("--cells-per-chunk", type=int, default=None,
                   help=f"cells per HDF5 file (default: {DEFAULT_CELLS_PER_CHUNK}, fewer when that would give "
                        f"less than {CHUNKS_PER_NODE_TARGET} chunks per node)")
    g.add_argument("--compression", choices=COMPRESSIONS, default="lz4",
                   help="lossless HDF5 filter (lz4/zstd: Blosc via hdf5plugin; readers need hdf5plugin)")
    g = p.add_argument_group("SLURM array / steps")
    g.add_argument("--array", action="store_true",
                   help="be one task of a job array, index from SLURM_ARRAY_TASK_ID; with --num-tasks N the id "
                        "is the index (so failed ids can be re-submitted alone), without it the array must be "
                        "one contiguous range and its size is N; writes a part manifest only")
    g.add_argument("--task-index", type=int, default=None, help="this task's index (0-based)")
    g.add_argument("--num-tasks", type=int, default=None, help="number of tasks the chunks are split among")
    g.add_argument("--merge", action="store_true", help="merge the finished tasks' parts into OUT/manifest.json")
    g.add_argument("--plan-only", action="store_true",
                   help="list and chunk the cells (OUT/plan.json), convert nothing: run once before a large "
                        "array so the tasks do not all list the source")
    g.add_argument("--verify", action="store_true",
                   help="check every chunk of OUT/manifest.json (size, checksum) and exit; names each bad chunk, "
                        "its cells and the commands that re-convert it (exit 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _array_env(environ: dict[str, str], num_tasks: int | None) -> tuple[int, int]:
    """(task_index, num_tasks) of this SLURM array task.

    With num_tasks given, the array task id is the task index itself, so a subset can be re-submitted
    (sbatch --array=17,40 … --array --num-tasks 64). Without it, the array must be one contiguous range
    (--array=0-63 or 1-64) and its size is the number of tasks.
    """
    try:
        task_id = int(environ["SLURM_ARRAY_TASK_ID"])
    except KeyError:
        raise ValueError("--array needs SLURM_ARRAY_TASK_ID (run it inside sbatch --array=0-N); outside SLURM "
                         "give --task-index and --num-tasks") from None
    if num_tasks is not None:
        if not 0 <= task_id < num_tasks:
            raise ValueError(f"SLURM_ARRAY_TASK_ID={task_id} is not a task index for --num-tasks {num_tasks}: "
                             f"submit with --array=0-{num_tasks - 1} (or a subset of those ids)")
        return task_id, num_tasks
    first = int(environ.get("SLURM_ARRAY_TASK_MIN", task_id))
    last = int(environ.get("SLURM_ARRAY_TASK_MAX", task_id))
    count = int(environ.get("SLURM_ARRAY_TASK_COUNT", last - first + 1))
    step = int(environ.get("SLURM_ARRAY_TASK_STEP", 1))
    if step != 1 or count != last - first + 1:
        raise ValueError(f"this array (ids {first}-{last}, {count} tasks) is not one contiguous range, so its "
                         f"size is not the number of tasks: add --num-tasks N (the total of the full array)")
    return task_id - first, count


def config_from_args(args, environ: dict[str, str] | None = None) -> ConvertConfig:
    """A ConvertConfig from parsed CLI arguments (and the SLURM array variables for --array)."""
    environ = dict(os.environ if environ is None else environ)
    task_index, num_tasks = args.task_index, args.num_tasks
    if args.array:
        if task_index is not None:
            raise ValueError("give either --array (index from SLURM) or --task-index, not both")
        task_index, num_tasks = _array_env(environ, num_tasks)
    elif (task_index is None) != (num_tasks is None):
        raise ValueError("--task-index and --num-tasks go together")
    bands = tuple(b.strip() for b in args.bands.split(",") if b.strip())
    return ConvertConfig(
        source=args.source, out=args.out, nodes=args.nodes, workers=args.workers, layout=args.layout,
        use_metadata=False if args.no_metadata else None, bands=bands, patch_size=args.patch_size,
        max_patch_nodata=args.max_patch_nodata, max_cell_nodata=args.max_cell_nodata,
        max_cloud_cover=args.max_cloud_cover, limit=args.limit, sample=args.sample, sample_seed=args.sample_seed,
        cells_per_chunk=args.cells_per_chunk, compression=args.compression, aux_buildings=args.aux_buildings,
        aux_landcover=args.aux_landcover,
        task_index=task_index or 0, num_tasks=num_tasks or 1, progress=not args.no_progress)


def _summary(doc: dict[str, Any]) -> str:
    c = doc["counts"]
    return (f"manifest: {doc['num_cells']} cells in {len(doc['chunks'])} chunks for "
            f"{doc['assignment']['num_nodes']} node(s); listed {c['listed']}, duplicates dropped "
            f"{c['duplicates']}, rejected {c['rejected']}, skipped {c['skipped']}")


def _verify(out: Path) -> int:
    """--verify: every chunk of OUT/manifest.json against its size and checksum, on VERIFY_THREADS threads;
    prints the rate, or each bad chunk with its cells and the commands that re-convert it. 0 all match, 1 not."""
    m = load_manifest(out)
    t0 = time.perf_counter()
    bad = find_bad_chunks(m)
    seconds = time.perf_counter() - t0
    gb = sum(c.bytes for c in m.chunks) / 1e9
    if not bad:
        print(f"all {len(m.chunks)} chunk checksums match ({gb:.2f} GB in {seconds:.1f} s, "
              f"{gb / max(seconds, 1e-9):.2f} GB/s)")
        return 0
    chunks = [c for c in m.chunks if c.index in bad]
    print(f"{len(bad)} of {len(m.chunks)} chunk file(s) differ from {out / MANIFEST_NAME}:\n"
          f"{describe_bad_chunks(m, bad)}\n{repair_text(m, chunks, verify_hint=False)}")
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI of preprocess/majortom_to_h5.py; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.verify:
            return _verify(args.out)
        if args.merge:
            doc = merge(args.out, nodes=args.nodes)
            print(_summary(doc) + f" -> {args.out / MANIFEST_NAME}")
            return 0
        if args.source is None and not (args.out / PLAN_JSON).is_file():
            parser.error("--source is required (unless OUT already holds a plan)")
        cfg = config_from_args(args)
        plan = load_or_make_plan(cfg)
        if args.plan_only:
            print(f"plan: {plan.counts['planned']} cells in {len(plan.chunks)} chunks of up to "
                  f"{plan.cells_per_chunk} ({plan.counts['duplicates']} duplicates dropped) -> "
                  f"{cfg.out / PLAN_JSON}")
            return 0
        part = convert_task(cfg, plan)
        n = sum(e["n_cells"] for e in part["chunks"])
        print(f"task {cfg.task_index}/{cfg.num_tasks}: {len(part['chunks'])} chunk(s), {n} cells -> "
              f"{cfg.out / PARTS_DIR / part_name(cfg.task_index, cfg.num_tasks)}")
        if cfg.num_tasks == 1:
            doc = merge(cfg.out, nodes=cfg.nodes)
            print(_summary(doc) + f" -> {cfg.out / MANIFEST_NAME}")
        return 0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
