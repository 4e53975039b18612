#!/usr/bin/env python
"""Convert MajorTOM Core-S2L2A / FastTOM into HDF5 chunk files + manifest.json for PhilEO pretraining.

    python preprocess/majortom_to_h5.py --source DIR --out DIR --nodes N [--workers K]
    # as a SLURM array (then one dependent job with --merge):
    sbatch --array=0-63 --wrap "python preprocess/majortom_to_h5.py --source DIR --out DIR --nodes N --array"
    python preprocess/majortom_to_h5.py --out DIR --nodes N --merge

All options: --help. The command line is phileo.data.cli; the steps are phileo.data.plan, .convert and .merge;
see README.md, "Preprocessing MajorTOM".
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from phileo.data.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
