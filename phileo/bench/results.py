"""Gathering a sweep's results: a CSV of every run, a Markdown table and metric-vs-n-shot plots.

Reads the sweep folder written by phileo.bench.sweep (sweep.json = the grid, tasks/NNNNN/result.json per
finished task, failed.json per failed one) and writes, into the sweep folder unless told otherwise:

- results.csv: one row per array task (index, model, task, n_shot, lr, seed, status, best validation loss,
  every scalar test metric, error for failed tasks).
- results.md: per task and metric, a table model x n-shot of mean +- std over seeds, at the learning rate whose
  mean *validation* loss is lowest (the test set never chooses anything), followed by the list of failed and
  missing array tasks by index and the sbatch line that re-runs them.
- plots/{task}_{metric}.png: the primary metric vs n-shot (log axis), one line per model, error bars = std over
  seeds, like the paper's figures.

Task status: completed (result.json), running or pending (SLURM lists it: running, queued, or back in the queue
after a requeue), failed (failed.json), incomplete (its folder exists but holds neither and SLURM does not list
it: killed without a trace, e.g. out of memory), missing (never started). Running and pending tasks are never
suggested for re-submission (that would start a second writer in the same folder); the re-run command is the
one of the path the sweep was launched with (jobs/launch_sweep.py, or sbatch slurm/finetune_array.sh).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from phileo import exit_codes
from phileo.fsutil import atomic_path, atomic_write_text, read_json
from phileo.bench.sweep import (FAILED_FILE, RESULT_FILE, SPEC_FILE, format_array_spec, queued_tasks, read_arrays,
                                task_dir)

# Metric shown first for each task (the paper's), and whether lower is better.
PRIMARY_METRIC = {"roads": "rmse", "building": "rmse", "lc": "overall_accuracy"}
TABLE_METRICS = {"roads": ("rmse", "mae", "f1"), "building": ("rmse", "mae", "f1"),
                 "lc": ("overall_accuracy", "miou", "macro_f1")}
LOWER_IS_BETTER = {"mse", "rmse", "mae"}
METRIC_LABELS = {"rmse": "RMSE", "mse": "MSE", "mae": "MAE", "f1": "F1 (thr. 0.5)", "overall_accuracy": "accuracy",
                 "miou": "mIoU", "macro_f1": "macro F1"}
STATUSES = ("completed", "running", "pending", "failed", "incomplete", "missing")


@dataclass
class TaskRecord:
    """One array task as found in the sweep folder."""

    index: int
    model: str
    task: str
    n_shot: int
    lr: float
    seed: int
    status: str
    best_val_loss: float | None = None
    test: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    error: str = ""


@dataclass
class SweepResults:
    """Everything collect_results found; `cells` are the table entries (see summarise)."""

    sweep_dir: Path
    name: str
    records: list[TaskRecord]
    cells: list[dict[str, Any]]
    slurm_asked: bool = False  # whether the queue was asked (running/pending are known only then)

    def by_status(self, status: str) -> list[TaskRecord]:
        return [r for r in self.records if r.status == status]


def _scalar_metrics(test: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in test.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n_pixels"}


def read_task(sweep_dir: Path, spec: dict[str, Any]) -> TaskRecord:
    index = int(spec["index"])
    rec = TaskRecord(index, spec["model"], spec["task"], int(spec["n_shot"]), float(spec["lr"]), int(spec["seed"]),
                     "missing")
    d = task_dir(sweep_dir, index)
    result_path = d / RESULT_FILE
    if result_path.exists():
        try:
            result = read_json(result_path, "task result")
        except ValueError as e:
            rec.status, rec.error = "failed", str(e)
            return rec
        if result.get("status") == "completed":
            rec.status = "completed"
            rec.best_val_loss = result.get("best_val_loss")
            rec.test = _scalar_metrics(result.get("test") or {})
            rec.info = {k: result.get(k) for k in ("best_epoch", "epochs_run", "stopped_early", "wall_time_s")}
            return rec
    failure = d / FAILED_FILE
    if failure.exists():
        rec.status = "failed"
        try:
            rec.error = "{error_type}: {error}".format(**read_json(failure, "task failure record"))
        except (ValueError, KeyError) as e:
            rec.error = f"unreadable failure record {failure}: {e}"
    elif (d / SPEC_FILE).exists() or d.exists():
        rec.status = "incomplete"
    return rec


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def summarise(records: Iterable[TaskRecord]) -> list[dict[str, Any]]:
    """Table cells: for each (model, task, n_shot) the LR with the lowest mean validation loss over its completed
    seeds, and mean/std over those seeds of every test metric. Cells without a completed run are left out."""
    groups: dict[tuple[str, str, int], dict[float, list[TaskRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.status == "completed" and r.best_val_loss is not None and math.isfinite(r.best_val_loss):
            groups[(r.model, r.task, r.n_shot)][r.lr].append(r)
    cells = []
    for (model, task, n_shot), by_lr in groups.items():
        val = {lr: statistics.fmean(r.best_val_loss for r in runs) for lr, runs in by_lr.items()}
        best_lr = min(val, key=lambda lr: (val[lr], lr))
        runs = by_lr[best_lr]
        metrics = {}
        for key in sorted(set.intersection(*(set(r.test) for r in runs))):
            metrics[key] = _mean_std([r.test[key] for r in runs])
        cells.append({"model": model, "task": task, "n_shot": n_shot, "lr": best_lr, "val_loss": val[best_lr],
                      "n_seeds": len(runs), "seeds": sorted(r.seed for r in runs), "metrics": metrics,
                      "val_loss_by_lr": val})
    return cells


def collect_results(sweep_dir: str | Path, ask_slurm: bool = True) -> SweepResults:
    """Reads a sweep folder (its sweep.json grid and every task folder) into records and table cells; a task that
    SLURM lists as running or pending (queued_tasks) is that, whatever its folder holds so far."""
    sweep_dir = Path(sweep_dir)
    snap = read_json(sweep_dir / "sweep.json",
                     f"sweep snapshot (no array task of the sweep in {sweep_dir} has started yet?)")
    records = [read_task(sweep_dir, spec) for spec in snap["tasks"]]
    queued = queued_tasks(sweep_dir) if ask_slurm else None
    for r in records:
        entry = (queued or {}).get(r.index)
        if entry is not None and entry.active and r.status != "completed":
            r.status, r.error = ("pending" if entry.pending else "running"), ""
    return SweepResults(sweep_dir, snap.get("name", sweep_dir.name), records, summarise(records), queued is not None)


# ------------------------------------------------------------------------------------------------ outputs
def _fmt(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:.4f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.3e}"


def write_csv(results: SweepResults, path: Path) -> Path:
    metric_keys = sorted({k for r in results.records for k in r.test})
    cols = ["index", "model", "task", "n_shot", "lr", "seed", "status", "best_val_loss", "best_epoch",
            "epochs_run"] + [f"test_{k}" for k in metric_keys] + ["error"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for r in sorted(results.records, key=lambda r: r.index):
        w.writerow([r.index, r.model, r.task, r.n_shot, f"{r.lr:g}", r.seed, r.status,
                    "" if r.best_val_loss is None else repr(float(r.best_val_loss)),
                    r.info.get("best_epoch", ""), r.info.get("epochs_run", "")]
                   + [repr(r.test[k]) if k in r.test else "" for k in metric_keys] + [r.error])
    return atomic_write_text(path, buf.getvalue())


def _order(values: Iterable[Any], first_seen: list[Any]) -> list[Any]:
    values = set(values)
    return [v for v in first_seen if v in values]


def rerun_hint(results: SweepResults) -> str | None:
    """The command that re-submits exactly the tasks that are neither finished nor running nor pending, by the
    path the sweep was launched with (its newest array record); None when there are none."""
    todo = [r.index for r in results.records if r.status in ("failed", "missing", "incomplete")]
    if not todo:
        return None
    snap = read_json(results.sweep_dir / "sweep.json", "sweep snapshot")
    arrays = read_arrays(results.sweep_dir)
    launcher = arrays[-1] if arrays else {}
    sweep_dir = results.sweep_dir.resolve()
    if launcher.get("launcher") == "launch_sweep":
        site = f" --site {launcher['site']}" if launcher.get("site") else ""
        return (f"python jobs/launch_sweep.py {launcher.get('sweep') or snap.get('source')} --out {sweep_dir}{site} "
                f"--indices {format_array_spec(todo)}")
    return (f"sbatch --array={format_array_spec(todo)} --export=ALL,PHILEO_SWEEP={snap.get('source')},"
            f"PHILEO_SWEEP_DIR={sweep_dir} slurm/finetune_array.sh")


def unasked_note(results: SweepResults) -> str | None:
    """Said when SLURM could not be asked: unfinished tasks may still be running."""
    unsure = [r.index for r in results.records if r.status == "incomplete"]
    if results.slurm_asked or not unsure:
        return None
    return (f"SLURM was not asked (no squeue here, or no array recorded in {results.sweep_dir / 'arrays'}): tasks "
            f"{format_array_spec(unsure)} may still be running or queued; check with phileo-status "
            f"{results.sweep_dir} on the login node before re-submitting them")


def markdown_report(results: SweepResults) -> str:
    recs = results.records
    models = list(dict.fromkeys(r.model for r in recs))
    tasks = list(dict.fromkeys(r.task for r in recs))
    counts = {s: len(results.by_status(s)) for s in STATUSES}
    lines = [f"# Sweep `{results.name}`", "",
             f"{len(recs)} array tasks: " + ", ".join(f"{counts[s]} {s}" for s in STATUSES) + ".", "",
             "Each cell: test metric, mean ± std over seeds, at the learning rate with the lowest mean validation "
             "loss (the test set chooses nothing); below it the chosen LR and the number of seeds.", ""]
    cell_of = {(c["model"], c["task"], c["n_shot"]): c for c in results.cells}
    for task in tasks:
        n_shots = sorted({r.n_shot for r in recs if r.task == task})
        for metric in TABLE_METRICS.get(task, (PRIMARY_METRIC.get(task, "loss"),)):
            better = "lower" if metric in LOWER_IS_BETTER else "higher"
            lines += [f"## {task}: test {METRIC_LABELS.get(metric, metric)} ({better} is better)", "",
                      "| model | " + " | ".join(f"n={n}" for n in n_shots) + " |",
                      "|---|" + "---|" * len(n_shots)]
            for model in models:
                row = []
                for n in n_shots:
                    c = cell_of.get((model, task, n))
                    if c is None or metric not in c["metrics"]:
                        row.append("—")
                        continue
                    mean, std = c["metrics"][metric]
                    spread = f" ± {_fmt(std)}" if std is not None else ""
                    row.append(f"{_fmt(mean)}{spread} (lr {c['lr']:g}, {c['n_seeds']} seed"
                               f"{'s' if c['n_seeds'] != 1 else ''})")
                lines.append(f"| {model} | " + " | ".join(row) + " |")
            lines.append("")
    failed, missing = results.by_status("failed"), results.by_status("missing") + results.by_status("incomplete")
    if failed or missing:
        lines += ["## Not finished", ""]
        if failed:
            lines += [f"Failed ({len(failed)}): indices {format_array_spec([r.index for r in failed])}", ""]
            lines += [f"- {r.index} `{r.model} {r.task} n={r.n_shot} lr={r.lr:g} seed={r.seed}`: "
                      f"{r.error.splitlines()[0][:200] if r.error else 'no message'} "
                      f"(see {task_dir(results.sweep_dir, r.index) / FAILED_FILE})" for r in failed]
            lines.append("")
        if missing:
            lines += [f"Missing or unfinished ({len(missing)}): indices "
                      f"{format_array_spec([r.index for r in missing])}", ""]
        lines += ["Re-run them with:", "", "```", rerun_hint(results) or "", "```", ""]
        if note := unasked_note(results):
            lines += [note, ""]
    return "\n".join(lines)


def plot_metric(results: SweepResults, task: str, metric: str, path: Path) -> Path | None:
    """metric vs n-shot for one task, one line per model (error bars: std over seeds). None when no data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in results.cells if c["task"] == task and metric in c["metrics"]]
    if not cells:
        return None
    models = _order((c["model"] for c in cells), list(dict.fromkeys(r.model for r in results.records)))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for model in models:
        pts = sorted((c["n_shot"], *c["metrics"][metric]) for c in cells if c["model"] == model)
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        err = [p[2] or 0.0 for p in pts]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=model)
    n_shots = sorted({c["n_shot"] for c in cells})
    ax.set_xscale("log")
    ax.set_xticks(n_shots)
    ax.set_xticklabels([str(n) for n in n_shots])
    ax.minorticks_off()
    label = METRIC_LABELS.get(metric, metric)
    ax.set_xlabel("n-shot (training patches per region)")
    ax.set_ylabel(f"test {label}")
    ax.set_title(f"{task}: test {label} vs n-shot")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


@dataclass
class CollectOutputs:
    csv: Path
    markdown: Path
    plots: list[Path]
    results: SweepResults


def write_outputs(sweep_dir: str | Path, out_dir: str | Path | None = None) -> CollectOutputs:
    """Collects a sweep folder and writes results.csv, results.md and plots/ (into out_dir, default sweep_dir)."""
    results = collect_results(sweep_dir)
    out = Path(out_dir) if out_dir is not None else Path(sweep_dir)
    csv_path = write_csv(results, out / "results.csv")
    md_path = atomic_write_text(out / "results.md", markdown_report(results))
    plots = []
    for task in dict.fromkeys(r.task for r in results.records):
        metric = PRIMARY_METRIC.get(task)
        if metric and (p := plot_metric(results, task, metric, out / "plots" / f"{task}_{metric}.png")):
            plots.append(p)
    return CollectOutputs(csv_path, md_path, plots, results)


__all__ = ["TaskRecord", "SweepResults", "CollectOutputs", "collect_results", "summarise", "write_csv",
           "markdown_report", "plot_metric", "write_outputs", "PRIMARY_METRIC", "TABLE_METRICS"]


# ------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Gather a fine-tuning sweep: results.csv, results.md (mean ± std over seeds, LR chosen on "
                    "validation) and plots/{task}_{metric}.png, and list failed / missing array tasks by index.")
    ap.add_argument("sweep_dir", type=Path, help="the sweep folder (PHILEO_SWEEP_DIR of finetune_array.sh)")
    ap.add_argument("--out", type=Path, default=None, help="write outputs here (default: the sweep folder)")
    ap.add_argument("--strict", action="store_true", help="exit 1 if any task failed or is unfinished")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """`phileo-results` / `jobs/collect_results.py`. Exit status (phileo.exit_codes): 0 written, 2 not a sweep
    folder, 1 with --strict when any array task failed or has not finished."""
    args = build_parser().parse_args(argv)
    try:
        outs = write_outputs(args.sweep_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.REFUSED
    res = outs.results
    counts = {s: len(res.by_status(s)) for s in STATUSES}
    print(f"sweep {res.name}: {len(res.records)} tasks, " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    print(f"wrote {outs.csv}\nwrote {outs.markdown}")
    for p in outs.plots:
        print(f"wrote {p}")
    for status in ("running", "pending", "failed", "incomplete", "missing"):
        recs = res.by_status(status)
        if recs:
            print(f"{status} array tasks: {format_array_spec([r.index for r in recs])}")
            for r in recs if status == "failed" else []:
                print(f"  {r.index}: {r.error.splitlines()[0][:200] if r.error else 'no message'}")
    hint = rerun_hint(res)
    if hint:
        print(f"re-run the failed, missing and incomplete ones (not the running or pending) with:\n  {hint}")
    if note := unasked_note(res):
        print(note)
    unfinished = any(r.status != "completed" for r in res.records)
    return exit_codes.FAILED if args.strict and unfinished else exit_codes.OK
