#!/usr/bin/env python
"""Submit a fine-tuning sweep as ONE SLURM job array (--array=0-(N-1)%K), split only at the site's MaxArraySize.

    python jobs/launch_sweep.py slurm/sweeps/phileo_bench.yaml --site leonardo --account PROJECT --out SWEEP_DIR
    python jobs/launch_sweep.py SWEEP.yaml --out SWEEP_DIR --indices 17      # re-run one task alone
    python jobs/collect_results.py SWEEP_DIR                                 # table + plots

Finished tasks are skipped, so re-running the same command resumes a sweep. All flags: --help.
"""

import os
import sys
from pathlib import Path

# Run this checkout's code here and in the job's processes (they inherit PYTHONPATH), installed or not.
REPO = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, REPO)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)

from phileo.launch.finetune import sweep_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
