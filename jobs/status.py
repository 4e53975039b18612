#!/usr/bin/env python
"""What a run or a sweep is doing: state, step, smoothed loss, throughput, ETA, checkpoint, requeues, disk use
(the same as `phileo-status`).

    python jobs/status.py RUN_OR_SWEEP_DIR [--json] [--watch [SECONDS]] [--all]

Reads only small files and the tail of metrics.jsonl; asks squeue where SLURM is. The work is done by
phileo.launch.status.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from phileo.launch.status import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
