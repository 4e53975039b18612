#!/usr/bin/env python
"""Gather a fine-tuning sweep: results.csv, results.md (mean ± std over seeds, LR chosen on validation) and
plots/{task}_{metric}.png, and list failed / missing array tasks by index.

    python jobs/collect_results.py SWEEP_DIR [--out DIR] [--strict]

--strict: exit 1 when any array task failed or has not finished (for scripts that wait on a sweep).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from phileo.bench.results import rerun_hint, write_outputs  # noqa: E402
from phileo.bench.sweep import format_array_spec  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir", type=Path, help="the sweep folder (PHILEO_SWEEP_DIR of finetune_array.sh)")
    ap.add_argument("--out", type=Path, default=None, help="write outputs here (default: the sweep folder)")
    ap.add_argument("--strict", action="store_true", help="exit 1 if any task failed or is unfinished")
    args = ap.parse_args(argv)
    try:
        outs = write_outputs(args.sweep_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = outs.results
    counts = {s: len(res.by_status(s)) for s in ("completed", "failed", "incomplete", "missing")}
    print(f"sweep {res.name}: {len(res.records)} tasks, " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    print(f"wrote {outs.csv}\nwrote {outs.markdown}")
    for p in outs.plots:
        print(f"wrote {p}")
    for status in ("failed", "incomplete", "missing"):
        recs = res.by_status(status)
        if recs:
            print(f"{status} array tasks: {format_array_spec([r.index for r in recs])}")
            for r in recs if status == "failed" else []:
                print(f"  {r.index}: {r.error.splitlines()[0][:200] if r.error else 'no message'}")
    hint = rerun_hint(res)
    if hint:
        print(f"re-run them with:\n  {hint}")
    return 1 if args.strict and hint else 0


if __name__ == "__main__":
    sys.exit(main())
