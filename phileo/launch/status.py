"""`phileo-status RUN_OR_SWEEP` (and `python jobs/status.py`): what a run or a sweep is doing, fast on a login node.

Reads only small files (state.json, launch.json, DONE, result.json, failed.json, the sweep's array records) and
the last METRICS_TAIL_BYTES of metrics.jsonl, never a checkpoint or a TensorBoard file, and asks squeue (and
sacct, where it works) once for all the jobs involved. Without SLURM, or for jobs SLURM no longer knows, the
run folder says the state.

    phileo-status $SCRATCH/phileo/runs/phileo-pretrain-20261203-120000
    phileo-status $SCRATCH/sweeps/phileo_bench --json        # for scripts
    phileo-status RUN --watch 30                             # refresh every 30 s (Ctrl-C ends)

A run's state: pending, running, requeued (back in the queue after the walltime signal), completed, failed,
preempted (stopped with a checkpoint, no requeue left: continue with --resume), stopped; a sweep task may also
be "not started" (neither queued nor begun). A job that SLURM no longer runs while the run folder still says
running/pending ended without recording it (killed, out of memory, cancelled, a node failure): it is failed.
Exit status: 0, or 2 when the path is neither a run nor a sweep folder.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from phileo import exit_codes
from phileo.fsutil import read_json
from phileo.run_state import STATE_FILE, read_state
from phileo.slurm_queue import QueueEntry, have_squeue, queue_states

METRICS_TAIL_BYTES = 64 * 1024
DATA_WAIT_WARN = 0.10  # above this share of step time the loader holds training back
RATE_RECORDS = 10      # logged steps the ETA's rate is measured over
SLURM_FAILED = frozenset({"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
                          "PREEMPTED", "REVOKED", "SPECIAL_EXIT"})
LIVE = ("pending", "running", "requeued")


# ------------------------------------------------------------------------------------------- small readers
def tail_records(path: Path, max_bytes: int = METRICS_TAIL_BYTES) -> list[dict[str, Any]]:
    """The complete JSON lines in the last `max_bytes` of metrics.jsonl, one per step (a later line of a step
    wins, as in phileo.train.metrics.read_metrics), in step order."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return []
    lines = data.split(b"\n")
    if size > max_bytes:
        lines = lines[1:]  # the first line is cut
    by_step: dict[int, dict[str, Any]] = {}
    for line in lines:
        try:
            rec = json.loads(line)
            by_step[int(rec["step"])] = rec
        except (ValueError, KeyError, TypeError):
            continue  # a line being written, or a cut one
    return [by_step[s] for s in sorted(by_step)]


def folder_bytes(path: Path) -> int:
    """Bytes of every file under `path` (stat only, nothing is read)."""
    total = 0
    stack = [path]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                    elif entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
        except OSError:
            continue
    return total


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        value = read_json(path, path.name)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _age_s(iso: Optional[str], now: float) -> Optional[float]:
    if not iso:
        return None
    try:
        return max(0.0, now - _dt.datetime.fromisoformat(iso).timestamp())
    except (TypeError, ValueError):
        return None


def _pid_dead_here(state: dict[str, Any]) -> bool:
    """The writer ran on this host and its process is gone (or a zombie)."""
    if state.get("host") != socket.gethostname() or not state.get("pid"):
        return False
    try:
        stat = Path(f"/proc/{int(state['pid'])}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, ValueError, IndexError):
        return True


# ------------------------------------------------------------------------------------------- state of a run
def decide_state(folder_state: Optional[str], entry: Optional[QueueEntry], asked_slurm: bool,
                 finished: bool, requeues: int = 0) -> tuple[str, str]:
    """(state, where it came from) from the run folder's state and SLURM's entry for its job.

    SLURM wins while the job is alive; a finished run folder (DONE / result.json) wins once it is not; a job
    SLURM no longer runs whose folder still says it is live ended without recording it: failed."""
    if entry is not None and entry.active:
        if entry.pending:
            back = folder_state in ("requeued", "preempted") or requeues > 0
            return ("requeued" if back else "pending"), "squeue"
        return "running", "squeue"
    if finished:
        return "completed", "run folder"
    if entry is not None and entry.state in SLURM_FAILED and folder_state not in ("preempted", "stopped", "failed"):
        return "failed", f"SLURM {entry.state}"
    if folder_state in LIVE and asked_slurm:
        return "failed", "no longer queued and no end recorded"
    return (folder_state or "unknown"), "run folder"


def run_status(run_dir: str | os.PathLike, ask_slurm: bool = True, entry: Optional[QueueEntry] = None,
               asked: Optional[bool] = None, now: Optional[float] = None) -> dict[str, Any]:
    """Everything the status command says about one run, as plain data (the --json output).

    squeue is asked for the run's job (ask_slurm); a caller that asked for many runs at once passes the run's
    `entry` (None: not listed) and `asked` (whether SLURM answered) instead."""
    run = Path(run_dir)
    now = time.time() if now is None else now
    try:
        state = read_state(run) or {}
        problem = None
    except ValueError as e:
        state, problem = {}, str(e)
    launch = _read_json(run / "launch.json") or {}
    job_id = state.get("job_id") or (launch.get("job_ids") or [None])[-1]
    on_slurm = launch.get("cluster", "slurm") != "local"
    if asked is None:
        queue = queue_states([str(job_id)]) if ask_slurm and job_id and on_slurm else None
        asked = queue is not None
        entry = (queue or {}).get(str(job_id))
    folder_state = state.get("state")
    if folder_state in LIVE and not asked and _pid_dead_here(state):
        folder_state = "failed"
        state["reason"] = state.get("reason") or f"process {state.get('pid')} ended without recording an end"
    decided, source = decide_state(folder_state, entry, asked, _finished(run, state),
                                   int(state.get("requeues") or 0))
    reason = problem or (entry.reason if entry is not None and entry.pending else None) or \
        (state.get("reason") if decided in ("failed", "preempted", "stopped") else None)
    if decided == "failed" and not reason and source != "run folder":
        reason = (f"{f'job {job_id}' if job_id else 'its job'} ended "
                  f"({entry.state if entry else 'no longer queued'}) without recording an end: killed, out of "
                  f"memory, cancelled or a node failure; see {run / 'logs'}")
    out: dict[str, Any] = {"kind": "run", "run_dir": str(run), "state": decided, "state_source": source,
                           "job_id": job_id, "slurm_state": entry.state if entry else None, "reason": reason,
                           "requeues": int(state.get("requeues") or 0), "failures": int(state.get("failures") or 0),
                           "max_failures": state.get("max_failures"), "updated": state.get("updated")}
    out.update(_progress(run, state, now))
    out["time_left_s"] = entry.time_left_s if entry is not None and entry.state == "RUNNING" else None
    out.update(_usage(state, run))
    return out


def _finished(run: Path, state: dict[str, Any]) -> bool:
    """Finished for good: state.json says completed, a fine-tuning run has its result.json, or a pretraining run
    its DONE marker (a fine-tuning run's DONE comes before its test, so it does not count)."""
    if state.get("state") == "completed":
        return True
    if (run / "result.json").is_file():
        return (_read_json(run / "result.json") or {}).get("status") == "completed"
    if not (run / "DONE").is_file():
        return False
    try:
        return "\nfinetune:" not in "\n" + (run / "config.yaml").read_text(errors="replace")
    except OSError:
        return True


def _progress(run: Path, state: dict[str, Any], now: float) -> dict[str, Any]:
    records = [r for r in tail_records(run / "metrics.jsonl") if "loss/total" in r]
    last = records[-1] if records else {}
    step = max(int(state.get("step") or 0), int(last.get("step") or 0))
    total = state.get("total_steps")
    loss = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("loss_window/")}
    if not loss and records:  # a run logged before loss_window/ existed: average what the tail holds
        window = records[-RATE_RECORDS:]
        keys = {k for r in window for k in r if k.startswith("loss/")}
        loss = {k.split("/", 1)[1]: sum(r.get(k, 0.0) for r in window) / len(window) for k in keys}
    out: dict[str, Any] = {"step": step, "total_steps": total, "loss": loss,
                           "samples_per_s": last.get("perf/samples_per_s"),
                           "samples_per_s_per_gpu": last.get("perf/samples_per_s_per_gpu"),
                           "mfu": last.get("perf/mfu"), "data_wait_frac": last.get("perf/data_wait_frac")}
    out["data_wait_warning"] = bool(out["data_wait_frac"] is not None and out["data_wait_frac"] > DATA_WAIT_WARN)
    # The rate over this launch's last logged steps (checkpoints and evaluations included): the honest ETA.
    started = _started_time(state)
    recent = [r for r in records if started is None or r.get("time", 0) >= started][-RATE_RECORDS:]
    eta = None
    if total and len(recent) >= 2 and recent[-1]["time"] > recent[0]["time"]:
        rate = (recent[-1]["step"] - recent[0]["step"]) / (recent[-1]["time"] - recent[0]["time"])
        eta = (int(total) - step) / rate if rate > 0 else None
    out["eta_s"] = eta
    ckpt = state.get("last_checkpoint")
    if not ckpt:
        ckpt = _newest_checkpoint(run)
    out["last_checkpoint"] = None if not ckpt else {**ckpt, "age_s": _age_s(ckpt.get("time"), now),
                                                     "exists": (run / str(ckpt.get("path", ""))).is_dir()}
    return out


def _started_time(state: dict[str, Any]) -> Optional[float]:
    for ev in reversed(state.get("events") or []):
        if ev.get("event") == "started":
            try:
                return _dt.datetime.fromisoformat(ev["time"]).timestamp()
            except (KeyError, TypeError, ValueError):
                return None
    return None


def _newest_checkpoint(run: Path) -> Optional[dict[str, Any]]:
    """From the folder names only (a run without state.json): the newest step_* and its time."""
    folder = run / "checkpoints"
    try:
        names = sorted(n for n in os.listdir(folder) if n.startswith("step_") and n[5:].isdigit())
    except OSError:
        return None
    if not names:
        return None
    mtime = (folder / names[-1]).stat().st_mtime
    return {"step": int(names[-1][5:]), "path": f"checkpoints/{names[-1]}",
            "time": _dt.datetime.fromtimestamp(mtime, _dt.timezone.utc).isoformat(timespec="seconds")}


def _usage(state: dict[str, Any], run: Path) -> dict[str, Any]:
    hours = float(state.get("compute_s") or 0.0) / 3600
    nodes = int(state.get("num_nodes") or 1)
    gpu = state.get("device") == "cuda"
    return {"node_hours": hours * nodes, "gpu_hours": hours * int(state.get("world_size") or 1) if gpu else None,
            "bytes": folder_bytes(run)}


# ------------------------------------------------------------------------------------------- a sweep
def is_sweep_dir(path: Path) -> bool:
    return (path / "sweep.json").is_file() or (path / "arrays").is_dir() or \
        (_read_json(path / "launch.json") or {}).get("kind") == "sweep"


def sweep_status(sweep_dir: str | os.PathLike, ask_slurm: bool = True, now: Optional[float] = None) -> dict[str, Any]:
    """Tasks by state with counts, the first error line of each failed task, bytes per task (the --json output)."""
    from phileo.bench.sweep import FAILED_FILE, RESULT_FILE, queued_tasks, read_sweep_snapshot, task_dir

    out_dir = Path(sweep_dir)
    now = time.time() if now is None else now
    try:
        snap = read_sweep_snapshot(out_dir)
        specs = snap["tasks"]
        name = snap.get("name", out_dir.name)
    except (OSError, ValueError, KeyError):
        specs, name = [], out_dir.name  # submitted, no task started yet
    queued = queued_tasks(out_dir) if ask_slurm else None
    if not specs and queued:
        specs = [{"index": i, "model": "?", "task": "?", "n_shot": 0, "lr": 0, "seed": 0} for i in sorted(queued)]
    tasks = []
    for spec in specs:
        index = int(spec["index"])
        d = task_dir(out_dir, index)
        label = f"{spec['model']}_{spec['task']}_n{spec['n_shot']}_lr{float(spec['lr']):g}_s{spec['seed']}"
        entry = (queued or {}).get(index)
        row: dict[str, Any] = {"index": index, "name": label}
        result = _read_json(d / RESULT_FILE) if (d / RESULT_FILE).is_file() else None
        if (result or {}).get("status") == "completed":
            row.update(state="completed", step=result.get("steps"), total_steps=result.get("steps"))
        elif (d / FAILED_FILE).is_file() and not (entry and entry.active):
            failure = _read_json(d / FAILED_FILE) or {}
            row["state"] = "failed"
            row["error"] = f"{failure.get('error_type', 'error')}: {failure.get('error', '')}".splitlines()[0][:200]
        elif d.is_dir():
            run = run_status(d, entry=entry, asked=queued is not None, now=now)
            row.update({k: run.get(k) for k in ("step", "total_steps", "loss", "eta_s", "bytes", "requeues",
                                                "failures")})
            row["state"] = run["state"] if run["state"] != "unknown" else "not started"
            if row["state"] == "failed":
                row["error"] = run.get("reason") or "ended without recording an end (killed or cancelled)"
        elif entry is not None and entry.active:
            row["state"] = "pending" if entry.pending else "running"
        else:
            row["state"] = "not started"
        row.setdefault("bytes", folder_bytes(d) if d.is_dir() else 0)
        tasks.append(row)
    counts: dict[str, int] = {}
    for row in tasks:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    return {"kind": "sweep", "sweep_dir": str(out_dir), "name": name, "n_tasks": len(tasks), "counts": counts,
            "slurm_asked": queued is not None, "tasks": tasks,
            "failed": [{"index": r["index"], "name": r["name"], "error": r.get("error", "")}
                       for r in tasks if r["state"] == "failed"],
            "bytes": sum(int(r.get("bytes") or 0) for r in tasks)}


def status(path: str | os.PathLike, ask_slurm: bool = True) -> dict[str, Any]:
    """run_status or sweep_status, by what the folder holds. Refuses (FileNotFoundError) anything else."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{p} is not a folder: give a run folder (with state.json or config.yaml) or a "
                                f"sweep folder (the --out of launch_sweep.py)")
    if is_sweep_dir(p):
        return sweep_status(p, ask_slurm=ask_slurm and have_squeue())
    if any((p / n).exists() for n in (STATE_FILE, "config.yaml", "launch.json", "metrics.jsonl")):
        return run_status(p, ask_slurm=ask_slurm and have_squeue())
    raise FileNotFoundError(f"{p} holds neither a run (state.json, config.yaml, launch.json) nor a sweep "
                            f"(sweep.json, arrays/): give the folder a launcher printed as 'run folder' or "
                            f"'sweep folder'")


# ------------------------------------------------------------------------------------------- --wait progress
class ProgressPrinter:
    """What `--wait` shows while a run trains: one line per logged step (step, smoothed loss, samples/s, ETA)
    read from the new lines of metrics.jsonl, or a tqdm bar when stdout is a terminal; and the run's state
    changes (pending -> running -> requeued ...) from state.json. Call poll() as often as you like."""

    def __init__(self, run_dir: str | os.PathLike, total_steps: Optional[int] = None, stream: Any = None,
                 bar: Optional[bool] = None):
        self.run_dir = Path(run_dir)
        self.total = total_steps
        self.stream = stream or sys.stdout
        self.offset = 0
        self.last_step = 0
        self.state: Optional[str] = None
        self.rates: list[tuple[float, int]] = []
        use_bar = self.stream.isatty() if bar is None else bar
        self.bar = None
        if use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, unit="step", file=self.stream, dynamic_ncols=True)

    def _new_records(self) -> list[dict[str, Any]]:
        path = self.run_dir / "metrics.jsonl"
        try:
            with open(path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except OSError:
            return []
        end = data.rfind(b"\n") + 1  # only complete lines; the rest is read next time
        self.offset += end
        out = []
        for line in data[:end].splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def poll(self) -> None:
        try:
            state = read_state(self.run_dir) or {}
        except ValueError:
            state = {}
        self.total = self.total or state.get("total_steps")
        if state.get("state") and state["state"] != self.state:
            self.state = state["state"]
            self._say(f"[{time.strftime('%H:%M:%S')}] {self.run_dir.name}: {self.state}"
                      + (f" ({state['events'][-1]['detail']})" if (state.get("events") or [{}])[-1].get("detail")
                         else ""))
        for rec in self._new_records():
            if "loss/total" not in rec or int(rec["step"]) <= self.last_step:
                continue
            self._step(rec)

    def _step(self, rec: dict[str, Any]) -> None:
        step = int(rec["step"])
        self.rates = (self.rates + [(float(rec.get("time", 0.0)), step)])[-RATE_RECORDS:]
        eta = None
        if self.total and len(self.rates) >= 2 and self.rates[-1][0] > self.rates[0][0]:
            rate = (self.rates[-1][1] - self.rates[0][1]) / (self.rates[-1][0] - self.rates[0][0])
            eta = (int(self.total) - step) / rate if rate > 0 else None
        loss = rec.get("loss_window/total", rec["loss/total"])
        sps = rec.get("perf/samples_per_s")
        if self.bar is not None:
            if self.total and self.bar.total != self.total:
                self.bar.total = int(self.total)
            self.bar.update(step - self.last_step)
            self.bar.set_postfix_str(f"loss {loss:.4g}" + (f", {sps:.4g} samples/s" if sps else ""))
        else:
            self._say(f"  step {step}" + (f"/{self.total}" if self.total else "") + f" | loss {loss:.4g}"
                      + (f" | {sps:.4g} samples/s" if sps else "") + f" | ETA {fmt_duration(eta)}")
        self.last_step = step

    def _say(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        self.poll()
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class SweepProgress:
    """What `--wait` shows while a sweep runs: a line when a task changes state, and the counts by state."""

    def __init__(self, sweep_dir: str | os.PathLike, stream: Any = None):
        self.sweep_dir = Path(sweep_dir)
        self.stream = stream or sys.stdout
        self.states: dict[int, str] = {}

    def poll(self) -> None:
        try:
            s = sweep_status(self.sweep_dir, ask_slurm=have_squeue())
        except (OSError, ValueError):
            return
        changed = [t for t in s["tasks"] if self.states.get(t["index"]) != t["state"]]
        if not changed:
            return
        for t in changed:
            if t["state"] != "not started":
                extra = f": {t['error']}" if t.get("error") else ""
                print(f"  task {t['index']} {t['name']}: {t['state']}{extra}", file=self.stream)
            self.states[t["index"]] = t["state"]
        counts = ", ".join(f"{n} {k}" for k, n in sorted(s["counts"].items()))
        print(f"[{time.strftime('%H:%M:%S')}] sweep {s['name']}: {counts}", file=self.stream, flush=True)


# ------------------------------------------------------------------------------------------- readable text
def fmt_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "n/a"
    seconds = int(round(seconds))
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    if d:
        return f"{d}d{h:02d}h"
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def fmt_bytes(n: Optional[float]) -> str:
    n = float(n or 0)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def _g4(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def format_run(s: dict[str, Any]) -> str:
    total = s.get("total_steps")
    lines = [f"run {s['run_dir']}",
             f"  state        {s['state']}" + (f" (job {s['job_id']}, {s['state_source']})" if s.get("job_id")
                                                else f" ({s['state_source']})")
             + (f": {s['reason']}" if s.get("reason") else ""),
             f"  step         {s['step']}" + (f"/{total} ({100 * s['step'] / total:.0f} %)" if total else "")]
    if s.get("loss"):
        loss = s["loss"]
        terms = ", ".join(f"{k} {_g4(v)}" for k, v in sorted(loss.items()) if k != "total")
        lines.append(f"  loss         {_g4(loss.get('total'))} (mean of the last log window)"
                     + (f"; {terms}" if terms else ""))
    if s.get("samples_per_s") is not None:
        lines.append(f"  throughput   {s['samples_per_s']:.4g} samples/s, {s['samples_per_s_per_gpu']:.4g} per "
                     f"{'GPU' if s.get('gpu_hours') is not None else 'process'}"
                     + (f", MFU {100 * s['mfu']:.1f} %" if s.get("mfu") is not None else ""))
    if s.get("data_wait_frac") is not None:
        lines.append(f"  data wait    {100 * s['data_wait_frac']:.0f} % of step time"
                     + ("  WARNING: the data loader holds training back (raise data.num_workers, stage the data "
                        "on a faster file system)" if s.get("data_wait_warning") else ""))
    if s["state"] == "running":
        lines.append(f"  ETA          end in {fmt_duration(s.get('eta_s'))}, walltime left "
                     f"{fmt_duration(s.get('time_left_s'))}"
                     + ("  (the job ends first: it requeues at the walltime signal)"
                        if s.get("eta_s") and s.get("time_left_s") and s["eta_s"] > s["time_left_s"] else ""))
    ck = s.get("last_checkpoint")
    if not ck:
        lines.append("  checkpoint   none yet")
    elif ck.get("exists", True):
        lines.append(f"  checkpoint   step {ck['step']} ({ck['path']}), {fmt_duration(ck.get('age_s'))} ago")
    else:
        lines.append(f"  checkpoint   step {ck['step']}, deleted after completion (the run's outputs stay: "
                     f"best_model.pt, result.json)" if s["state"] == "completed" else
                     f"  checkpoint   step {ck['step']} ({ck['path']}) is gone")
    lines.append(f"  requeues     {s['requeues']}, failures {s['failures']}"
                 + (f"/{s['max_failures']}" if s.get("max_failures") is not None else ""))
    used = f"{s['node_hours']:.3g} node-hours" + (f", {s['gpu_hours']:.3g} GPU-hours" if s.get("gpu_hours") else "")
    lines.append(f"  used         {used}; {fmt_bytes(s['bytes'])} on disk")
    return "\n".join(lines)


STATE_ORDER = ("running", "pending", "requeued", "completed", "failed", "preempted", "stopped", "not started")


def format_sweep(s: dict[str, Any], rows: int = 40) -> str:
    counts = s["counts"]
    order = [k for k in STATE_ORDER if k in counts] + sorted(k for k in counts if k not in STATE_ORDER)
    lines = [f"sweep {s['name']} ({s['sweep_dir']}): {s['n_tasks']} tasks, {fmt_bytes(s['bytes'])} on disk",
             "  " + ", ".join(f"{counts[k]} {k}" for k in order)
             + ("" if s.get("slurm_asked") else "  (SLURM not asked: states from the task folders)"), "",
             f"  {'task':>5}  {'state':<12} {'step':>11}  {'loss':>9}  {'ETA':>7}  {'disk':>8}  name"]
    shown = sorted(s["tasks"], key=lambda r: (STATE_ORDER.index(r["state"]) if r["state"] in STATE_ORDER else 99,
                                              r["index"]))
    for r in shown[:rows]:
        step = f"{r.get('step') or 0}/{r['total_steps']}" if r.get("total_steps") else ""
        loss = _g4((r.get("loss") or {}).get("total")) if r.get("loss") else ""
        eta = fmt_duration(r["eta_s"]) if r.get("eta_s") and r["state"] == "running" else ""
        lines.append(f"  {r['index']:>5}  {r['state']:<12} {step:>11}  {loss:>9}  {eta:>7}  "
                     f"{fmt_bytes(r.get('bytes')):>8}  {r['name']}")
    if len(shown) > rows:
        lines.append(f"  ... {len(shown) - rows} more (--all lists every task, --json gives them all)")
    if s["failed"]:
        lines += ["", "  failed tasks (first error line; the traceback is in tasks/<index>/failed.json):"]
        lines += [f"  {f['index']:>5}  {f['name']}: {f['error']}" for f in s["failed"][:rows]]
        if len(s["failed"]) > rows:
            lines.append(f"  ... {len(s['failed']) - rows} more failed tasks")
    return "\n".join(lines)


def format_status(s: dict[str, Any], rows: int = 40) -> str:
    return format_sweep(s, rows) if s["kind"] == "sweep" else format_run(s)


# ------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("path", help="a run folder or a sweep folder")
    p.add_argument("--json", action="store_true", help="print the status as JSON (for scripts)")
    p.add_argument("--watch", type=float, nargs="?", const=10.0, default=None, metavar="SECONDS",
                   help="refresh every SECONDS (default 10) until Ctrl-C")
    p.add_argument("--all", action="store_true", help="list every task of a sweep (default: the first 40)")
    p.add_argument("--no-slurm", action="store_true", help="do not ask squeue/sacct: the run folders only")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.watch is not None and args.watch <= 0:
        print("error: --watch SECONDS must be > 0", file=sys.stderr)
        return exit_codes.REFUSED
    try:
        while True:
            try:
                s = status(args.path, ask_slurm=not args.no_slurm)
            except (FileNotFoundError, ValueError) as e:
                print(f"error: {e}", file=sys.stderr)
                return exit_codes.REFUSED
            text = (json.dumps(s, indent=2, default=str) if args.json
                    else format_status(s, 10 ** 9 if args.all else 40))
            if args.watch is not None and sys.stdout.isatty():
                print("\033[2J\033[H", end="")  # clear the screen between refreshes
            print(text, flush=True)
            if args.watch is None:
                return exit_codes.OK
            time.sleep(args.watch)
    except KeyboardInterrupt:  # --watch ends with Ctrl-C
        return exit_codes.OK


__all__ = ["ProgressPrinter", "SweepProgress", "run_status", "sweep_status", "status", "decide_state",
           "tail_records", "folder_bytes", "format_status", "format_run", "format_sweep", "fmt_duration", "fmt_bytes",
           "main", "METRICS_TAIL_BYTES"]
