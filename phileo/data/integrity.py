"""Whether a converted set's chunk files are what its manifest says, and how to repair them when they are not.

A chunk file whose bytes changed after the converter checksummed it (a flipped bit on disk, a truncated copy, a
file replaced by hand) would otherwise train silently on wrong pixels, or crash at a random step with an HDF5
filter error that names neither the file nor the cell. So:

- training verifies every chunk at each start, spread over the job's ranks (phileo.train.pretrain:
  FoundationTask.prepare_data, config keys data.verify_chunks and data.on_bad_chunk), with `find_bad_chunks`:
  a size check (one stat: catches truncation), then the whole-file checksum (manifest.chunk_problem);
- a bad chunk is reported as BadChunkError (phileo.data.chunk_format; retrying cannot help) by `bad_chunk_error`:
  each chunk file, what differs, the cells it holds, and the commands that repair the set (`repair_commands`:
  which array task converts the chunk, and how to make the converter redo it);
- a read that fails later anyway (PretrainDataset) is a ChunkReadError (`chunk_read_error`) naming the file, the
  cell and the same fix;
- `python preprocess/majortom_to_h5.py --verify --out OUT` prints `describe_bad_chunks` and `repair_commands`.

Cost: verification reads every byte once. crc32 runs at ~3 GB/s per core, and zlib and file reads release the
GIL, so `find_bad_chunks` checks files on VERIFY_THREADS threads and keeps up with a plain read of the files;
benchmarks/README.md ("Chunk verification") has the figures and what they mean for a real set.
"""

from __future__ import annotations

import shlex
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from phileo.data import chunk_format as fmt
from phileo.data.chunk_format import BadChunkError, ChunkReadError
from phileo.data.manifest import ChunkInfo, Manifest, chunk_problem
from phileo.data.plan import content_flags, task_chunks
from phileo.fsutil import open_h5_read, read_json

# Files checked at once per process. Reads and crc32 release the GIL; 4 keep a core's worth of crc32 busy while
# others wait on the file system, without one rank flooding a node's Lustre client (a node runs one per GPU).
VERIFY_THREADS = 4
CONVERTER = "python preprocess/majortom_to_h5.py"
CELLS_SHOWN = 4  # cells named per chunk in a message ("… and N more")


def find_bad_chunks(manifest: Manifest, chunks: Iterable[ChunkInfo] | None = None,
                    threads: int = VERIFY_THREADS) -> dict[int, str]:
    """Checks `chunks` (default: every chunk of the manifest) against the manifest, `threads` files at a time;
    returns {chunk index: what differs} for the bad ones (empty: all match). Reads each file once."""
    todo = list(manifest.chunks if chunks is None else chunks)
    if threads <= 1 or len(todo) <= 1:
        problems = [chunk_problem(manifest, c) for c in todo]
    else:
        with ThreadPoolExecutor(min(threads, len(todo)), thread_name_prefix="chunk-verify") as pool:
            problems = list(pool.map(lambda c: chunk_problem(manifest, c), todo))
    return {c.index: p for c, p in zip(todo, problems) if p is not None}


def rank_share(manifest: Manifest, global_rank: int, world_size: int) -> list[ChunkInfo]:
    """The chunks global rank `global_rank` of `world_size` verifies: every world_size-th of the manifest's list,
    so that each chunk is read once per job and the bytes spread evenly (chunks are of similar size)."""
    return manifest.chunks[global_rank::world_size]


def chunk_cells(manifest: Manifest, chunk: ChunkInfo) -> tuple[list[str], str]:
    """(grid cells, where they were read) of a chunk: from the file's cells/grid_cell when it still reads, else
    the cells plan.parquet planned for it (rejected and skipped ones included), else none."""
    try:
        with open_h5_read(manifest.chunk_path(chunk)) as f:
            return [s.decode() if isinstance(s, bytes) else str(s) for s in f[fmt.GRID_CELL][...]], "in the file"
    except (OSError, KeyError, ValueError, RuntimeError):
        pass  # the file is damaged where its metadata lives, or missing: the plan knows what was put in it
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(manifest.root / fmt.PLAN_CELLS, columns=["chunk", "grid_cell"],
                              filters=[("chunk", "==", chunk.index)])
        return [str(s) for s in table.column("grid_cell").to_pylist()], f"planned ({fmt.PLAN_CELLS})"
    except Exception:  # no plan next to the manifest (a copied set), or unreadable: say so, do not fail
        return [], "unknown (the file does not read and there is no readable plan.parquet)"


def cells_text(cells: Sequence[str], shown: int = CELLS_SHOWN) -> str:
    """'1U-2R, 3D-4L and 6 more' (the first `shown` cells)."""
    if not cells:
        return "none known"
    head = ", ".join(cells[:shown])
    return head if len(cells) <= shown else f"{head} and {len(cells) - shown} more"


def conversion_tasks(root: Path) -> int:
    """The number of array tasks the set in `root` was converted with, from its part manifests' names
    (parts/task_TTTTT-of-NNNNN.json; the most common N when tasks of several counts ran); 1 without any."""
    counts = Counter(p.stem.rpartition("-of-")[2] for p in (root / fmt.PARTS_DIR).glob(fmt.PART_GLOB))
    numbers = {int(n): k for n, k in counts.items() if n.isdigit()}
    return max(numbers, key=lambda n: (numbers[n], n)) if numbers else 1


def _planned_chunks(manifest: Manifest) -> int:
    """Chunks in the plan, the empty ones included (task_chunks splits those, not the manifest's list)."""
    try:
        return int(read_json(manifest.root / fmt.PLAN_JSON, what="conversion plan")["n_chunks"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return int(manifest.counts.get("chunks", len(manifest.chunks))) + int(manifest.counts.get("empty_chunks", 0))


def repair_commands(manifest: Manifest, chunks: Sequence[ChunkInfo]) -> list[str]:
    """Shell commands that re-convert exactly `chunks` and re-merge the manifest.

    The converter reuses a chunk whose file and sidecar exist with the plan's fingerprint and the recorded size,
    so a damaged chunk of the right size would be kept: the first command deletes each file and its sidecar.
    Then the array task that converts it (task_chunks) runs again with --out alone (the plan supplies the
    source and the auxiliary rasters) plus the content flags the plan was made with; it reuses that task's
    other chunks. A one-task conversion merges by itself; otherwise a --merge follows. Conversion is
    deterministic, so the new file has the checksum the manifest already recorded.
    """
    root = manifest.root
    out = shlex.quote(str(root))
    nodes = int(manifest.assignment.get("num_nodes", 1) or 1)
    flags = " ".join(shlex.quote(f) for f in content_flags(manifest.raw.get("config", {})))
    flags = f" {flags}" if flags else ""
    files = [shlex.quote(str(root / fmt.CHUNKS_DIR / name)) for c in chunks
             for name in (fmt.chunk_name(c.index), fmt.sidecar_name(c.index))]
    commands = [f"rm -f {' '.join(files)}"]
    num_tasks = conversion_tasks(root)
    if num_tasks == 1:
        return commands + [f"{CONVERTER} --out {out}{flags} --nodes {nodes}"]
    n_planned = _planned_chunks(manifest)
    tasks = sorted({t for c in chunks for t in range(num_tasks) if c.index in task_chunks(n_planned, t, num_tasks)})
    commands += [f"{CONVERTER} --out {out} --task-index {t} --num-tasks {num_tasks}{flags}" for t in tasks]
    return commands + [f"{CONVERTER} --out {out} --nodes {nodes} --merge"]


def repair_text(manifest: Manifest, chunks: Sequence[ChunkInfo], suspected: bool = False,
                verify_hint: bool = True) -> str:
    """How to check the whole set (the --verify command, unless not `verify_hint`) and re-convert `chunks`
    (repair_commands). `suspected`: the chunks are not known to be bad yet, so re-converting depends on --verify."""
    out = shlex.quote(str(manifest.root))
    source = manifest.raw.get("config", {}).get("source") or "the plan's --source"
    then = "if it names this chunk, re-convert it" if suspected else "re-convert the bad chunk(s)"
    check = f"Check every chunk with: {CONVERTER} --verify --out {out}\n" if verify_hint else ""
    return (f"{check}{then[0].upper()}{then[1:]} (the MajorTOM source must still be at {source}):\n"
            + "\n".join(f"  {c}" for c in repair_commands(manifest, chunks)))


def describe_bad_chunks(manifest: Manifest, bad: Mapping[int, str]) -> str:
    """One line per bad chunk: its file, what differs, the cells it holds."""
    by_index = {c.index: c for c in manifest.chunks}
    lines = []
    for index in sorted(bad):
        c = by_index[index]
        cells, where = chunk_cells(manifest, c)
        lines.append(f"  {manifest.chunk_path(c)}: {bad[index]}; {len(cells) or c.n_cells} cells {where}: "
                     f"{cells_text(cells)}")
    return "\n".join(lines)


def bad_chunk_error(manifest: Manifest, bad: Mapping[int, str], training: bool = True) -> BadChunkError:
    """The BadChunkError for the chunks `bad` ({chunk index: what differs}, from find_bad_chunks): each chunk
    file, what differs, its cells, and the fix; `training`: add what the trainer did and its skip option."""
    chunks = [c for c in manifest.chunks if c.index in bad]
    names = ", ".join(Path(c.path).name for c in chunks[:3]) + (" ..." if len(chunks) > 3 else "")
    head = (f"{len(chunks)} chunk file(s) of {manifest.root} ({names}) differ from {fmt.MANIFEST_NAME}, so their "
            f"pixels cannot be trusted" + (" (training stopped before its first step)" if training else "") + ":")
    tail = ("\nOr train without them: data.on_bad_chunk=skip leaves their cells out (counted in log.txt and as "
            "data/bad_chunks in TensorBoard)." if training else "")
    # Only I/O errors (no size or checksum that differs): the file may read at the next start.
    io_only = all(problem.startswith("unreadable") for problem in bad.values())
    return BadChunkError(f"{head}\n{describe_bad_chunks(manifest, bad)}\n{repair_text(manifest, chunks)}{tail}",
                         tuple(c.path for c in chunks), retryable=io_only)


def chunk_read_error(manifest: Manifest, chunk: ChunkInfo, error: BaseException, grid_cell: str | None = None,
                     row: int | None = None) -> ChunkReadError:
    """The ChunkReadError for a failed read of `chunk` (of cell `grid_cell` at `row`, or of its cell metadata
    when None): the file, the cell, the original error, and the fix."""
    what = f"cell {grid_cell} (row {row})" if grid_cell is not None else "the cell metadata"
    return ChunkReadError(
        f"cannot read {what} of chunk file {manifest.chunk_path(chunk)}: {type(error).__name__}: {error}. "
        f"Either the file is damaged (since the start-up verification, or it was not verified: "
        f"data.verify_chunks=false) or the read itself failed (an I/O fault: running again may succeed).\n"
        f"{repair_text(manifest, [chunk], suspected=True)}", str(manifest.chunk_path(chunk)))


__all__ = ["VERIFY_THREADS", "find_bad_chunks", "rank_share", "chunk_cells", "cells_text", "conversion_tasks",
           "repair_commands", "repair_text", "describe_bad_chunks", "bad_chunk_error", "chunk_read_error",
           "BadChunkError", "ChunkReadError"]
