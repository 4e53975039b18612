#!/usr/bin/env python
"""`make demo`: the whole pipeline end to end on generated data, through the same launchers a cluster user runs.

    python jobs/demo.py [--out demo] [--cluster local|slurm] [--steps 200] [--fresh]

The work is done by phileo.demo.
"""

import os
import sys
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, REPO)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)

from phileo.demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
