"""Generated MajorTOM data shared by the data/preprocess tests (generated once per session, then reused).

Cells are real-size (1068 px) so generation costs ~0.4 s a cell: the sets are small and cached here rather
than in per-module fixtures, because several test modules import these helpers.
"""

from __future__ import annotations

from pathlib import Path

N_CELLS = 8
SEED = 3
# Cells 1 and 4 (index % 3 == 1) carry a no-data swath edge; cell 1 is also duplicated.
FAULTS = dict(duplicates=[1], truncated=[5], missing_band=[6], wrong_size=[7])
GOOD = [0, 1, 2, 3, 4]

_cache: dict[str, Path] = {}


def _dir(tmp_path_factory, name: str) -> Path:
    return tmp_path_factory.getbasetemp() / "preprocess-data" / name


def parquet_source(tmp_path_factory) -> Path:
    """root holding Core-S2L2A/ in the published parquet layout (2 shards of 4 cells + 1 duplicate row)."""
    from phileo.data.synthetic import write_majortom_parquet

    if "parquet" not in _cache:
        root = _dir(tmp_path_factory, "parquet")
        write_majortom_parquet(root, N_CELLS, seed=SEED, cells_per_shard=4, **FAULTS)
        _cache["parquet"] = root
    return _cache["parquet"]


def tree_source(tmp_path_factory) -> Path:
    """The same cells as parquet_source, unpacked into the tree layout (as MajorTOM's helper does; quicker
    than generating them again; write_majortom_tree itself is checked against the parquet separately)."""
    from phileo.data.majortom import unpack_parquet_to_tree

    if "tree" not in _cache:
        root = _dir(tmp_path_factory, "tree")
        unpack_parquet_to_tree(parquet_source(tmp_path_factory), root)
        _cache["tree"] = root
    return _cache["tree"]


def converted(tmp_path_factory, layout: str = "parquet") -> Path:
    """parquet_source/tree_source converted with 2 cells per chunk, assignment for 2 nodes."""
    from phileo.data.convert import convert
    from phileo.data.plan import ConvertConfig

    key = f"converted-{layout}"
    if key not in _cache:
        src = parquet_source(tmp_path_factory) if layout == "parquet" else tree_source(tmp_path_factory)
        out = _dir(tmp_path_factory, key)
        convert(ConvertConfig(source=src, out=out, nodes=2, cells_per_chunk=2, progress=False))
        _cache[key] = out
    return _cache[key]


def cell_index(grid_cell: str) -> int:
    from phileo.data.synthetic import cell_spec

    for i in range(N_CELLS):
        if cell_spec(i, SEED).grid_cell == grid_cell:
            return i
    raise KeyError(grid_cell)


def source_cells(tmp_path_factory) -> dict[tuple[str, str], object]:
    """(grid_cell, product_id) → decoded Cell (10 bands + mask) of every good cell, read from the parquet."""
    from phileo.data.majortom import MajorTOMSource

    if "cells" not in _cache:
        src = MajorTOMSource(parquet_source(tmp_path_factory))
        cells = {}
        for ref in src.list_cells():
            try:
                cells[ref.key] = src.read_cell(ref)
            except Exception:
                pass
        _cache["cells"] = cells  # type: ignore[assignment]
    return _cache["cells"]  # type: ignore[return-value]
