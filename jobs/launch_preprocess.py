#!/usr/bin/env python
"""Convert MajorTOM into HDF5 chunks + manifest: a SLURM job array of converter slices, then a dependent merge.

    python jobs/launch_preprocess.py --site leonardo --account PROJECT --source $WORK/MajorTOM \
        --out $WORK/majortom/shards --tasks 64 --train-nodes 16 --time 08:00:00
    python jobs/launch_preprocess.py --cluster local --source src --out shards --tasks 2 --cells-per-chunk 2

Unknown flags are passed to preprocess/majortom_to_h5.py. All flags: --help; see README.md, "Launching jobs".
"""

import os
import sys
from pathlib import Path

# Run this checkout's code here and in the job's processes (they inherit PYTHONPATH), installed or not.
REPO = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, REPO)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)

from phileo.launch.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
