#!/usr/bin/env python
"""Submit PhilEO pretraining: a checked multi-node SLURM job (or local processes) that requeues itself.

    python jobs/launch_pretrain.py --site leonardo --account PROJECT --nodes 16 --data $WORK/majortom/shards
    python jobs/launch_pretrain.py --site leonardo --account PROJECT --nodes 16 --data ... --dry-run
    python jobs/launch_pretrain.py --cluster local --gpus-per-node 2 --data shards --steps 50 --wait
    python jobs/launch_pretrain.py --resume RUN_DIR

All flags: --help. The work is done by phileo.launch.pretrain; see README.md, "Launching jobs".
"""

import os
import sys
from pathlib import Path

# Run this checkout's code here and in the job's processes (they inherit PYTHONPATH), installed or not.
REPO = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, REPO)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)

from phileo.launch.pretrain import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
