"""`make demo` in a reduced form: the same entry points (jobs/demo.py -> the launchers), fewer steps.

Checks that every stage produced its outputs: the manifest, checkpoints, TensorBoard events with the expected
tags (read back with TensorBoard's own reader), the results table and plots; and that a re-run reuses them.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _demo(out: Path, *extra: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(REPO / "jobs" / "demo.py"), "--out", str(out), "--steps", "12",
                           "--cells", "4", *extra], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=REPO)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = _demo(out)
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return out, proc


def test_preprocess_stage_wrote_a_manifest(demo_run):
    out, _ = demo_run
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    chunks = manifest["chunks"]
    assert chunks and sum(c["n_cells"] for c in chunks) == 4
    assert all((out / "shards" / c["path"]).exists() for c in chunks)


def test_pretrain_stage_checkpointed_and_logged(demo_run):
    out, _ = demo_run
    run = out / "runs" / "pretrain"
    done = json.loads((run / "DONE").read_text())
    assert done["step"] == 12
    steps = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert steps[-1] == "step_00000012" and (run / "checkpoints" / steps[-1] / "model.pt").exists()
    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    scalars = set(ea.Tags()["scalars"])
    for tag in ("loss/total", "loss/reconstruction", "loss/coords", "loss/clouds", "lr", "grad_norm",
                "perf/samples_per_s", "perf/samples_per_s_per_gpu",
                "loss/buildings", "loss/landcover"):  # the demo converts with the synthetic global rasters
        assert tag in scalars, f"TensorBoard tag {tag} missing; have {sorted(scalars)}"
    assert ea.Scalars("loss/total")[-1].step == 12
    assert any(t.startswith("images/") for t in ea.Tags()["images"])


def test_sweep_stage_wrote_results_table_and_plots(demo_run):
    out, proc = demo_run
    sweep = out / "sweep"
    rows = list(csv.DictReader((sweep / "results.csv").open()))
    # 2 models x 2 tasks x 2 n-shots x 1 lr x 2 seeds, all completed.
    assert len(rows) == 16 and {r["status"] for r in rows} == {"completed"}
    assert {r["model"] for r in rows} == {"tiny_scratch", "tiny_pretrained"}
    table = (sweep / "results.md").read_text()
    assert "tiny_pretrained" in table and "±" in table
    plots = list((sweep / "plots").glob("*.png"))
    assert len(plots) >= 2 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    # The pretrained model of the sweep really started from the pretraining run just made.
    cfgs = [json.loads(p.read_text()) for p in (sweep / "tasks").glob("*/result.json")]
    inits = {c["config"]["model"]["init"] for c in cfgs}
    assert str((out / "runs" / "pretrain").resolve()) in inits
    # The demo ends by saying where things are and how to look at them.
    assert "tensorboard --logdir" in proc.stdout and "results table" in proc.stdout
    # ... and ends with the status table: the pretraining run and every sweep task completed.
    tail = proc.stdout.split("=== Status", 1)[1]
    assert "state        completed" in tail and "16 completed" in tail and "on disk" in tail
    # --wait showed live progress of the pretraining (a line per logged step with the smoothed loss).
    assert "step 12/12 | loss " in proc.stdout
    # The numbers are labelled for what they are, with the settings the demo really ran.
    assert "a smoke test of the pipeline (phileo_cnn_tiny, 12 pretraining steps on 4 generated cells" in proc.stdout
    assert "not a result" in proc.stdout and "<br>" not in proc.stdout


def test_rerun_reuses_finished_stages(demo_run):
    out, _ = demo_run
    before = (out / "runs" / "pretrain" / "DONE").stat().st_mtime_ns
    t0 = time.monotonic()
    proc = _demo(out, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("reusing") >= 4
    assert (out / "runs" / "pretrain" / "DONE").stat().st_mtime_ns == before
    assert time.monotonic() - t0 < 120
