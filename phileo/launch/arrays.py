"""Job arrays within the site's MaxArraySize.

SLURM refuses an array whose largest index is MaxArraySize or more (`sbatch: error: Batch job submission
failed: Invalid job array specification`). A sweep larger than that is submitted as several arrays of at most
MaxArraySize tasks each, every one indexed from 0 (the task's place in the sweep travels with the job); each
array after the first waits for the previous one (`afterany`), so no more than `%K` tasks run at once overall.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

from phileo.launch.sites import SiteProfile
from phileo.launch.slurm import scontrol_config_value

T = TypeVar("T")

# SLURM's compiled-in default MaxArraySize.
SLURM_DEFAULT_MAX_ARRAY_SIZE = 1001


def site_max_array_size(site: SiteProfile, ask_slurm: bool = True) -> int:
    """The largest array (in tasks) the site accepts: the profile's value, else `scontrol show config`'s
    MaxArraySize, else SLURM's default (1001)."""
    if site.max_array_size is not None:
        return site.max_array_size
    if ask_slurm:
        value = scontrol_config_value("MaxArraySize")
        if value and value.strip().isdigit():
            return int(value)
    return SLURM_DEFAULT_MAX_ARRAY_SIZE


def split_for_arrays(items: Sequence[T], max_array_size: int) -> list[list[T]]:
    """`items` in consecutive groups of at most `max_array_size` (one job array each); [] for no items.

    Refuses max_array_size < 1.
    """
    if max_array_size < 1:
        raise ValueError(f"max_array_size must be >= 1, got {max_array_size}")
    items = list(items)
    return [items[i:i + max_array_size] for i in range(0, len(items), max_array_size)]
