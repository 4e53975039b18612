"""phileo-status on real run folders written by the engine, on a synthetic 360-task sweep folder (timed), and
the rules that turn the run folder and SLURM's answer into one state. The dev-cluster states are in
tests/test_status_cluster.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phileo.fsutil import atomic_write_json
from phileo.launch import status as st
from phileo.run_state import read_state, update_state
from phileo.slurm_queue import QueueEntry, parse_duration_s
from phileo.train.engine import Trainer
from phileo.train.metrics import LossWindow, read_metrics

from test_engine import ToyTask, toy_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from status import make_synthetic_sweep  # noqa: E402  (the benchmark's sweep folder)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("status") / "run"
    cfg = toy_config(run, "run.log_every_steps=3", "train.steps=7")
    result = Trainer(cfg, ToyTask()).fit()
    return run, result


def test_the_engine_records_its_run_and_status_reads_it_back(toy_run):
    run, result = toy_run
    state = read_state(run)
    assert state["state"] == "completed" and state["step"] == 7 and state["total_steps"] == 7
    assert state["last_checkpoint"]["path"] == "checkpoints/step_00000007"
    assert [e["event"] for e in state["events"]][-2:] == ["started", "completed"]
    s = st.status(run, ask_slurm=False)
    assert s["state"] == "completed" and s["step"] == 7 and s["last_checkpoint"]["step"] == 7
    assert s["bytes"] == sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
    # The smoothed loss is the mean over the last log window (steps 7 alone: 7 is logged as the last step,
    # and the window holds the log_every_steps=3 newest steps 5, 6, 7).
    metrics = read_metrics(run)
    per_step = [metrics[s]["loss/total"] for s in (7,)]
    assert metrics[7]["loss_window/total"] == pytest.approx(result.final_loss)
    assert s["loss"]["total"] == pytest.approx(result.final_loss)
    assert set(s["loss"]) == {"total", "mse", "l1"}
    assert per_step[0] != pytest.approx(result.final_loss)  # one batch is not the window's mean
    text = st.format_status(s)
    assert "completed" in text and "step 7 (checkpoints/step_00000007)" in text


def test_final_loss_is_the_window_mean_and_printed_to_4_significant_figures(toy_run):
    run, result = toy_run
    log = (run / "log.txt").read_text()
    assert f"final loss {result.final_loss:.4g}," in log
    line = [ln for ln in log.splitlines() if "step 6/7 |" in ln][0]
    assert f"loss {read_metrics(run)[6]['loss_window/total']:.4g} |" in line


def test_loss_window_resumes_exactly():
    w = LossWindow(3)
    for i in range(5):
        w.add(float(i), {"a": 2.0 * i})
    again = LossWindow(3)
    again.load_state_dict(json.loads(json.dumps(w.state_dict())))
    assert again.mean() == w.mean() == {"loss_window/total": 3.0, "loss_window/a": 6.0}


@pytest.mark.parametrize("folder,entry,asked,finished,want", [
    ("running", QueueEntry("1", "RUNNING"), True, False, "running"),
    ("pending", QueueEntry("1", "PENDING"), True, False, "pending"),
    ("requeued", QueueEntry("1", "PENDING"), True, False, "requeued"),
    ("running", None, True, False, "failed"),              # gone from the queue without recording an end
    ("running", QueueEntry("1", "CANCELLED"), True, False, "failed"),
    ("running", None, False, False, "running"),            # SLURM not asked: the folder's word
    ("running", QueueEntry("1", "COMPLETED"), True, True, "completed"),
    ("preempted", None, True, False, "preempted"),
])
def test_state_rules(folder, entry, asked, finished, want):
    assert st.decide_state(folder, entry, asked, finished)[0] == want


def test_a_dead_local_process_is_a_failed_run(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    update_state(tmp_path, "running", pid=proc.pid)
    state = json.loads((tmp_path / "state.json").read_text())
    state["pid"] = proc.pid
    atomic_write_json(tmp_path / "state.json", state)
    s = st.status(tmp_path, ask_slurm=False)
    assert s["state"] == "failed" and str(proc.pid) in s["reason"]


def test_only_the_tail_of_metrics_is_read(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with open(path, "w") as fh:
        for step in range(1, 20001):
            fh.write(json.dumps({"step": step, "time": 1000.0 + step, "loss/total": 1.0 / step}) + "\n")
    assert path.stat().st_size > 10 * st.METRICS_TAIL_BYTES
    records = st.tail_records(path)
    assert records[-1]["step"] == 20000 and 0 < len(records) < 2000
    assert [r["step"] for r in records] == list(range(records[0]["step"], 20001))


def test_durations_and_sizes_read_well():
    assert parse_duration_s("1-02:03:04") == 93784 and parse_duration_s("05:00") == 300
    assert parse_duration_s("UNLIMITED") is None
    assert st.fmt_duration(3725) == "1h02m" and st.fmt_bytes(75_300_000) == "75.3 MB"


def test_a_360_task_sweep_in_under_2_seconds(tmp_path):
    want = make_synthetic_sweep(tmp_path)
    t0 = time.perf_counter()
    s = st.status(tmp_path, ask_slurm=False)
    elapsed = time.perf_counter() - t0
    assert s["kind"] == "sweep" and s["n_tasks"] == 360
    assert s["counts"] == want
    assert s["failed"][0] == {"index": 1, "name": "m0_roads_n50_lr0.001_s1", "error": "RuntimeError: boom 1"}
    running = [t for t in s["tasks"] if t["state"] == "running"]
    assert running[0]["step"] == 2000 and running[0]["loss"]["total"] == 0.25
    assert elapsed < 2.0, f"status of 360 tasks took {elapsed:.2f} s"
    text = st.format_sweep(s)
    assert "90 running" in text and "90 failed" in text and "boom 1" in text


def test_cli_json_and_a_clear_refusal(toy_run, tmp_path):
    run, _ = toy_run
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "status.py"), str(run), "--json", "--no-slurm"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["state"] == "completed"
    bad = subprocess.run([sys.executable, str(REPO / "jobs" / "status.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "neither a run" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_watch_refreshes_until_interrupted(toy_run):
    import signal

    run, _ = toy_run
    # A background shell starts its children with SIGINT ignored: give this one the terminal's Ctrl-C back.
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "status.py"), str(run), "--watch", "0.3",
                             "--no-slurm"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    lines = []
    while len([ln for ln in lines if ln.startswith("run ")]) < 2:
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
        lines.append(proc.stdout.readline())
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_wait_progress_prints_a_line_per_logged_step(tmp_path):
    import io

    update_state(tmp_path, "pending", total_steps=100)
    out = io.StringIO()
    progress = st.ProgressPrinter(tmp_path, stream=out, bar=False)
    progress.poll()
    update_state(tmp_path, "running", event="started", detail="from step 0")
    with open(tmp_path / "metrics.jsonl", "w") as fh:
        for step in (10, 20):
            fh.write(json.dumps({"step": step, "time": 100.0 + step, "loss/total": 9.0,
                                 "loss_window/total": 1.234567, "perf/samples_per_s": 42.0}) + "\n")
        fh.write('{"step": 30, "time": 1')  # a line being written: not read yet
    progress.poll()
    lines = out.getvalue().splitlines()
    assert "pending" in lines[0] and "running (from step 0)" in lines[1]
    assert lines[2:] == ["  step 10/100 | loss 1.235 | 42 samples/s | ETA n/a",
                         "  step 20/100 | loss 1.235 | 42 samples/s | ETA 1m20s"]
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('30.0, "loss/total": 1.0}\n')
    progress.close()
    assert out.getvalue().splitlines()[-1].startswith("  step 30/100 | loss 1 |")
