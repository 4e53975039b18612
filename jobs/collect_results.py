#!/usr/bin/env python
"""Gather a fine-tuning sweep: results.csv, results.md (mean ± std over seeds, LR chosen on validation) and
plots/{task}_{metric}.png, and list failed / missing array tasks by index (the same as `phileo-results`).

    python jobs/collect_results.py SWEEP_DIR [--out DIR] [--strict]

--strict: exit 1 when any array task failed or has not finished (for scripts that wait on a sweep).
The work is done by phileo.bench.results.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from phileo.bench.results import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
