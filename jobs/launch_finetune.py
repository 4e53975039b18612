#!/usr/bin/env python
"""Submit one PhilEO Bench fine-tuning run (requeues itself at the time limit).

    python jobs/launch_finetune.py --site leonardo --account PROJECT --model phileo_cnn_44m --task roads \\
        --n-shot 100 --data $WORK/phileo_bench --init $WORK/weights/phileo_cnn_44m.pt
    python jobs/launch_finetune.py --cluster local --task roads --n-shot 50 --data bench train.max_epochs=2 --wait

All flags: --help; see README.md, "Launching jobs".
"""

import os
import sys
from pathlib import Path

# Run this checkout's code here and in the job's processes (they inherit PYTHONPATH), installed or not.
REPO = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, REPO)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)

from phileo.launch.finetune import finetune_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
