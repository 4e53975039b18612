"""A stand-in training entry point for launcher tests: counts steps, stops on USR2/TERM like the engine does.

It keeps the engine's contract (flag-only stop handlers, status "completed" | "preempted", resume from what the
run folder holds) at no compute cost, so the launcher's requeue machinery can be tested on its own. Imported by
the job's processes: the tests put this folder on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class FakeConfig:
    dir: str = ""
    steps: int = 20
    step_s: float = 0.25
    fail_starts: int = 0  # the first this many starts raise (a failure that is not a preemption)


@dataclass
class FakeResult:
    status: str
    step: int
    final_loss: float
    run_dir: str


def fake_train(cfg: FakeConfig) -> FakeResult:
    run = Path(cfg.dir)
    run.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    state = run / f"state_rank{rank}.json"
    step = json.loads(state.read_text())["step"] if state.exists() else 0
    attempt = len(list(run.glob(f"start_rank{rank}_*.json")))
    (run / f"start_rank{rank}_{attempt}.json").write_text(json.dumps({
        "step": step, "env": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "SLURM_RESTART_COUNT")}}))
    if attempt < cfg.fail_starts:
        raise RuntimeError(f"injected failure at start {attempt}")
    stop = {"flag": False}

    def handler(signum, frame):
        stop["flag"] = True

    previous = {s: signal.signal(s, handler) for s in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        while step < cfg.steps:
            if stop["flag"]:
                state.write_text(json.dumps({"step": step}))
                return FakeResult("preempted", step, 1.0 / (1 + step), str(run))
            time.sleep(cfg.step_s)
            step += 1
        state.write_text(json.dumps({"step": step}))
        return FakeResult("completed", step, 1.0 / (1 + step), str(run))
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
