"""Sets of array-task indices in SLURM's range syntax, the one formatter for sbatch --array values and for
messages that name tasks to re-run: [0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'.

At the bottom of the import graph (no phileo imports) so the converter, the launchers and PhilEO Bench's
sweeps all use it.
"""

from __future__ import annotations

from typing import Iterable


def format_ranges(indices: Iterable[int]) -> str:
    """Sorted, de-duplicated `indices` as comma-separated runs ('0-2,5,7-8'); '' for none."""
    idx = sorted({int(i) for i in indices})
    parts = []
    i = 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        parts.append(str(idx[i]) if i == j else f"{idx[i]}-{idx[j]}")
        i = j + 1
    return ",".join(parts)
