#!/usr/bin/env python
"""phileo-status on a synthetic 360-task sweep folder (the paper's grid) as it looks mid-campaign: how long one
status call takes (goal: under 2 s on a login node), and that no checkpoint is read.

    python benchmarks/status.py [--tasks 360] [--repeats 5] [--json status.json]

A quarter of the tasks each: completed (result.json of the real size: val history and config included,
best_model.pt), failed (failed.json), running (state.json, a 2000-line metrics.jsonl, a 75 MB resume checkpoint
as a sparse file: only stat() may touch it), not started. squeue is asked where it is installed (one call).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phileo.fsutil import atomic_write_json  # noqa: E402
from phileo.run_state import update_state  # noqa: E402

KINDS = ("completed", "failed", "running", "not started")


def make_synthetic_sweep(out: Path, n: int = 360, checkpoint_bytes: int = 75_000_000) -> dict[str, int]:
    """Writes the sweep folder; returns the number of tasks of each kind."""
    specs = [{"index": i, "model": f"m{i // 90}", "task": "roads", "n_shot": 50, "lr": 1e-3, "seed": i % 3}
             for i in range(n)]
    atomic_write_json(out / "sweep.json", {"name": "synthetic", "n_tasks": n, "tasks": specs})
    want = dict.fromkeys(KINDS, 0)
    for i in range(n):
        d = out / "tasks" / f"{i:05d}"
        kind = KINDS[i % 4]
        want[kind] += 1
        if kind == "not started":
            continue
        d.mkdir(parents=True)
        atomic_write_json(d / "spec.json", specs[i])
        if kind == "completed":
            atomic_write_json(d / "result.json", {"status": "completed", "test": {"rmse": 0.1},
                                                  "val_history": [[s, 0.5] for s in range(250)],
                                                  "config": {"k": "v" * 2000}})
            (d / "best_model.pt").write_bytes(b"\0" * 4096)
        elif kind == "failed":
            atomic_write_json(d / "failed.json", {"error_type": "RuntimeError", "error": f"boom {i}\nline 2"})
        else:
            update_state(d, "running", step=120, total_steps=250, pid=os.getpid())
            with open(d / "metrics.jsonl", "w") as fh:
                for step in range(1, 2001):
                    fh.write(json.dumps({"step": step, "time": 1e9 + step, "loss/total": 0.5,
                                         "loss_window/total": 0.25, "perf/samples_per_s": 10.0}) + "\n")
            ckpt = d / "checkpoints" / "step_00000100"
            ckpt.mkdir(parents=True)
            with open(ckpt / "model.pt", "wb") as fh:
                fh.truncate(checkpoint_bytes)  # sparse: a read would show in the timing, a stat does not
    return want


def main() -> int:
    from phileo.launch.status import status

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=360)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        want = make_synthetic_sweep(Path(tmp), args.tasks)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            s = status(tmp)
            times.append(time.perf_counter() - t0)
        assert s["counts"] == want, (s["counts"], want)
    report = {"tasks": args.tasks, "median_s": statistics.median(times), "max_s": max(times),
              "slurm_asked": s["slurm_asked"], "goal_s": 2.0}
    print(f"status of a {args.tasks}-task sweep: median {report['median_s']:.3f} s, max {report['max_s']:.3f} s "
          f"over {args.repeats} calls (goal < 2 s)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["max_s"] < 2.0 else 1


if __name__ == "__main__":
    sys.exit(main())
