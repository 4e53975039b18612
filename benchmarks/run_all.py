#!/usr/bin/env python
"""Runs every benchmark in turn (`make bench`) with the settings recorded in benchmarks/README.md.

Each benchmark measures its subject side by side with its baseline in one process and prints ratios; this
script only runs them one after another (never in parallel: they would disturb each other's timings).
Pass --only preprocess|models|engine|status|verify to run one.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BENCHMARKS = {
    "preprocess": ["preprocess.py", "--cells", "12", "--repeats", "3"],
    "models": ["models.py", "--threads", "1", "--steps", "5"],
    "engine": ["engine.py"],
    "status": ["status.py"],
    "verify": ["verify.py", "--copies", "16", "--repeats", "3", "--startups", "5"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=sorted(BENCHMARKS), action="append")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    failed = []
    for name in args.only or list(BENCHMARKS):
        script, *flags = BENCHMARKS[name]
        print(f"\n===== benchmarks/{script} {' '.join(flags)}", flush=True)
        t0 = time.monotonic()
        rc = subprocess.run([sys.executable, str(HERE / script), *flags], env=env, cwd=REPO).returncode
        print(f"===== {name}: exit {rc} after {time.monotonic() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
