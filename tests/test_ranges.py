"""phileo.ranges: the one formatter of index sets in SLURM's range syntax."""

from phileo.ranges import format_ranges


def test_runs_are_joined_sorted_and_deduplicated():
    assert format_ranges([8, 0, 2, 1, 7, 5, 2]) == "0-2,5,7-8"
    assert format_ranges(range(360)) == "0-359"
    assert format_ranges([3]) == "3" and format_ranges([]) == ""
