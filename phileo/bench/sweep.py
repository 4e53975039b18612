"""Hyperparameter sweeps as one SLURM job array: a sweep file expands to a numbered grid of fine-tuning runs.

A sweep file (YAML, e.g. slurm/sweeps/phileo_bench.yaml):

    name: phileo_bench          # optional (default: the file name)
    max_parallel: 32            # optional: at most this many array tasks run at once (the %K of --array)
    time_per_task: "04:00:00"   # optional: walltime of one task (default DEFAULT_TASK_TIME, sized for a
                                # fine-tune, not the site maximum: short jobs backfill); requeues cover the rest
    recipe: published           # optional: the preset under `base` (phileo.train.recipes; default: default)
    base:                       # FinetuneConfig overrides shared by every task (dotted keys)
      data.root: ${PHILEO_BENCH_DATA}
      finetune.max_epochs: 250
    models:                     # one entry per model variant: a label and its overrides (or just a preset name)
      - {label: cnn44m_scratch, model.name: phileo_cnn_44m, model.init: scratch}
      - {label: cnn44m_published, model.name: phileo_cnn_44m, model.init: ${PHILEO_WEIGHTS}/phileo_cnn_44m.pt}
      - phileo_vit_100m
    tasks: [roads, building, lc]          # -> data.task
    n_shots: [50, 100, 500, 1000, 5000]   # -> data.n_shot
    lrs: [1.0e-3, 1.0e-4]                 # -> optim.lr
    seeds: [0, 1, 2]                      # -> train.seed

expands to models x tasks x n_shots x lrs x seeds tasks, numbered from 0 in that order (seed varies fastest).
`${VAR}` in string values is read from the environment when a task runs (not when the sweep is expanded), so
the sweep can be counted and checked on a machine without the data. Every task's overrides are checked against
FinetuneConfig at expansion: a typo fails before anything is submitted.

Sweep folder (`--out`): `sweep.yaml` (copy of the file) and `sweep.json` (the expanded grid) written by the first
task; `tasks/00017/` is task 17's run folder (config, checkpoints, TensorBoard, `result.json` when finished,
`failed.json` with the traceback when it failed). A folder that holds a different grid is refused, since the
indices would no longer mean the same runs. A finished task (result.json) is skipped when run again, so a sweep
is resumed by submitting it again, or only its unfinished indices (`python -m phileo.bench.sweep array SWEEP
--out DIR`).

CLI:  python -m phileo.bench.sweep run SWEEP.yaml --out DIR [--index I]   (I defaults to $SLURM_ARRAY_TASK_ID)
      python -m phileo.bench.sweep list SWEEP.yaml | count SWEEP.yaml | array SWEEP.yaml [--out DIR]
Exit status of `run` (phileo.exit_codes): 0 finished (or already finished), 75 preempted before the time limit
(checkpoint saved: requeue it), 1 failed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import os
import re
import socket
import sys
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence


from phileo import exit_codes
from phileo.config import ConfigError, read_yaml_mapping
from phileo.fsutil import atomic_write_json, atomic_write_text, read_json
from phileo.ranges import format_ranges

# Grid axis -> config key it sets.
AXES = {"task": "data.task", "n_shot": "data.n_shot", "lr": "optim.lr", "seed": "train.seed"}
SWEEP_KEYS = ("name", "max_parallel", "time_per_task", "recipe", "base", "models", "tasks", "n_shots", "lrs",
              "seeds")
DEFAULT_TASK_TIME = "04:00:00"
RESULT_FILE = "result.json"
FAILED_FILE = "failed.json"
SPEC_FILE = "spec.json"
_ENV_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")


class SweepError(ValueError):
    """A sweep file or sweep folder that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class TaskSpec:
    """One array task of a sweep: its index, grid coordinates and the full config overrides it runs with."""

    index: int
    model: str
    task: str
    n_shot: int
    lr: float
    seed: int
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.model}_{self.task}_n{self.n_shot}_lr{self.lr:g}_s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Sweep:
    """A parsed sweep file (see module docstring)."""

    path: Path
    name: str
    base: dict[str, Any]
    models: list[dict[str, Any]]
    tasks: list[str]
    n_shots: list[int]
    lrs: list[float]
    seeds: list[int]
    max_parallel: int | None = None
    time_per_task: str = DEFAULT_TASK_TIME

    @property
    def size(self) -> int:
        return len(self.models) * len(self.tasks) * len(self.n_shots) * len(self.lrs) * len(self.seeds)


def _as_list(doc: dict, key: str, path: Path, convert) -> list:
    value = doc.get(key)
    if value is None:
        raise SweepError(f"{path}: '{key}' is missing; give a list (see phileo.bench.sweep)")
    if not isinstance(value, list):
        value = [value]
    if not value:
        raise SweepError(f"{path}: '{key}' is an empty list: the sweep would have no tasks")
    out = []
    for v in value:
        try:
            out.append(convert(v))
        except (TypeError, ValueError):
            raise SweepError(f"{path}: '{key}' entry {v!r} is not a {convert.__name__}") from None
    if len(set(map(repr, out))) != len(out):
        raise SweepError(f"{path}: '{key}' lists a value twice: {value}")
    return out


def _model_entry(entry: Any, path: Path) -> dict[str, Any]:
    if isinstance(entry, str):
        return {"label": entry, "model.name": entry}
    if not isinstance(entry, dict) or "label" not in entry:
        raise SweepError(f"{path}: each 'models' entry is a preset name or a mapping with a 'label' and "
                         f"overrides such as model.name / model.init; got {entry!r}")
    entry = dict(entry)
    label = str(entry["label"])
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", label):
        raise SweepError(f"{path}: model label {label!r} must be letters, digits, '_', '.', '+' or '-' "
                         f"(it names results and plot lines)")
    entry["label"] = label
    return entry


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Parses and checks a sweep file. Refuses unknown top-level keys, empty or repeated grid values, duplicate
    model labels, overrides that set a grid axis, and overrides FinetuneConfig does not accept."""
    path = Path(path)
    doc = read_yaml_mapping(path, what="sweep file", error=SweepError)
    unknown = sorted(set(doc) - set(SWEEP_KEYS))
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {unknown}; a sweep file has {', '.join(SWEEP_KEYS)}")
    base = doc.get("base") or {}
    if not isinstance(base, dict):
        raise SweepError(f"{path}: 'base' must be a mapping of config keys to values (e.g. finetune.max_epochs: 250)")
    if doc.get("recipe") is not None:
        # The same as `recipe:` in base: build_config puts that recipe's preset under every task's overrides.
        base = {"recipe": doc["recipe"], **base}
    models = [_model_entry(m, path) for m in (doc.get("models") or [])]
    if not models:
        raise SweepError(f"{path}: 'models' is missing or empty: list at least one model")
    labels = [m["label"] for m in models]
    if len(set(labels)) != len(labels):
        raise SweepError(f"{path}: model labels must be unique, got {labels}")
    max_parallel = doc.get("max_parallel")
    if max_parallel is not None and (not isinstance(max_parallel, int) or max_parallel < 1):
        raise SweepError(f"{path}: max_parallel must be a positive integer, got {max_parallel!r}")
    sweep = Sweep(
        path=path, name=str(doc.get("name") or path.stem), base=dict(base), models=models,
        tasks=_as_list(doc, "tasks", path, str), n_shots=_as_list(doc, "n_shots", path, int),
        lrs=_as_list(doc, "lrs", path, float), seeds=_as_list(doc, "seeds", path, int), max_parallel=max_parallel,
        time_per_task=str(doc.get("time_per_task") or DEFAULT_TASK_TIME))
    for where, mapping in [("base", base)] + [(f"model '{m['label']}'", m) for m in models]:
        clash = sorted(set(mapping) & set(AXES.values()))
        if clash:
            raise SweepError(f"{path}: {where} sets {clash}, which the grid sets (use tasks/n_shots/lrs/seeds)")
    return sweep


def _task_overrides(sweep: Sweep, model: dict[str, Any], coords: dict[str, Any]) -> dict[str, Any]:
    overrides = dict(sweep.base)
    overrides.update({k: v for k, v in model.items() if k != "label"})
    overrides.update({AXES[axis]: value for axis, value in coords.items()})
    return overrides


def expand_sweep(path: str | os.PathLike) -> list[TaskSpec]:
    """The sweep's tasks in array order: models x tasks x n_shots x lrs x seeds, seed fastest, index from 0.

    Each task's overrides are checked against FinetuneConfig (SweepError naming the model and key otherwise).
    """
    from phileo.bench.config import FinetuneConfig
    from phileo.train.config import build_config

    sweep = load_sweep(path)
    specs = []
    checked: set[str] = set()
    for i, (model, task, n_shot, lr, seed) in enumerate(
            itertools.product(sweep.models, sweep.tasks, sweep.n_shots, sweep.lrs, sweep.seeds)):
        overrides = _task_overrides(sweep, model, {"task": task, "n_shot": n_shot, "lr": lr, "seed": seed})
        key = repr(sorted(overrides.items(), key=lambda kv: kv[0]))
        if key not in checked:  # one config build per distinct override set, not per seed
            try:
                build_config(FinetuneConfig, overrides=overrides)
            except ConfigError as e:
                raise SweepError(f"{sweep.path}: model '{model['label']}', task {task}, n_shot {n_shot}: {e}") from None
            checked.add(key)
        specs.append(TaskSpec(i, model["label"], task, n_shot, lr, seed, overrides))
    return specs


def format_array_spec(indices: Sequence[int], max_parallel: int | None = None) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (+ '%K' with max_parallel): the value of sbatch --array."""
    spec = format_ranges(indices)
    if not spec:
        raise SweepError("no array indices to submit")
    return spec + (f"%{max_parallel}" if max_parallel else "")


def array_range(path: str | os.PathLike) -> str:
    """The sbatch --array value that covers the whole sweep, e.g. '0-359%32'."""
    sweep = load_sweep(path)
    return format_array_spec(range(len(expand_sweep(path))), sweep.max_parallel)


# ------------------------------------------------------------------------------------------- sweep folder
def task_dir(out_dir: str | os.PathLike, index: int) -> Path:
    """Run folder of array task `index` in a sweep folder: OUT/tasks/00017."""
    return Path(out_dir) / "tasks" / f"{int(index):05d}"


def task_finished(out_dir: str | os.PathLike, index: int) -> bool:
    """True when array task `index` wrote its result.json with status completed (it is then never re-run)."""
    path = task_dir(out_dir, index) / RESULT_FILE
    if not path.exists():
        return False
    try:
        return read_json(path, "task result").get("status") == "completed"
    except ValueError:
        return False  # a damaged result is re-done, not trusted


def task_failed(out_dir: str | os.PathLike, index: int) -> dict[str, Any] | None:
    """The failure record of array task `index` (failed.json), or None."""
    path = task_dir(out_dir, index) / FAILED_FILE
    if not path.exists():
        return None
    try:
        return read_json(path, "task failure record")
    except ValueError:
        return {"error": f"unreadable {path}"}


def pending_indices(sweep_path: str | os.PathLike, out_dir: str | os.PathLike) -> list[int]:
    """Indices of the sweep's tasks to submit again: not finished in `out_dir`, and not running or pending in
    SLURM's queue (re-submitting those would start a second writer in the same task folder)."""
    busy = active_tasks(out_dir) or set()
    return [s.index for s in expand_sweep(sweep_path) if not task_finished(out_dir, s.index) and s.index not in busy]


ARRAYS_DIR = "arrays"
LAUNCHERS = ("launch_sweep", "finetune_array.sh")


def record_array(out_dir: str | os.PathLike, job_id: str, launcher: str, tasks: Sequence[int] | None = None,
                 sweep_path: str | os.PathLike | None = None, site: str | None = None) -> Path:
    """OUT/arrays/<job_id>.json: one submitted array and which sweep task each array index runs (`tasks[k]` for
    array index k; None: index k is sweep task k, as with finetune_array.sh). One file per array, written
    atomically, so concurrent writers never lose one. Status and re-submission read these."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
    record = {"job_id": str(job_id), "launcher": launcher, "tasks": None if tasks is None else list(tasks),
              "sweep": str(Path(sweep_path).resolve()) if sweep_path else None, "site": site,
              "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    return atomic_write_json(Path(out_dir) / ARRAYS_DIR / f"{job_id}.json", record)


def read_arrays(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The sweep folder's array records, oldest first (unreadable ones are skipped: they are a cache of squeue)."""
    folder = Path(out_dir) / ARRAYS_DIR
    records = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            records.append(read_json(path, "array record"))
        except ValueError:
            continue
    return sorted(records, key=lambda r: (r.get("time") or "", str(r.get("job_id"))))


def queued_tasks(out_dir: str | os.PathLike) -> dict[int, Any] | None:
    """{sweep task index: its phileo.slurm_queue.QueueEntry} for every task SLURM still lists (or sacct knows) of
    the arrays recorded in the sweep folder; a later array wins. None when SLURM cannot be asked (no squeue, no
    answer, or no array recorded): then nothing is known about the queue."""
    from phileo.slurm_queue import have_squeue, queue_states

    arrays = read_arrays(out_dir)
    if not arrays or not have_squeue():
        return None  # run locally, or nothing recorded: the queue cannot be asked about this sweep
    states = queue_states(str(a["job_id"]) for a in arrays)
    if states is None:
        return None
    out: dict[int, Any] = {}
    for a in arrays:
        tasks = a.get("tasks")
        for job, entry in states.items():
            base, _, k = job.partition("_")
            if base != str(a["job_id"]) or not k.isdigit():
                continue
            k = int(k)
            index = k if tasks is None else (tasks[k] if k < len(tasks) else None)
            if index is not None:
                out[index] = entry
    return out


def active_tasks(out_dir: str | os.PathLike) -> set[int] | None:
    """Sweep task indices that are running or pending (requeued included); None when SLURM cannot be asked."""
    queued = queued_tasks(out_dir)
    return None if queued is None else {i for i, e in queued.items() if e.active}


def _snapshot(sweep_path: Path, specs: list[TaskSpec]) -> dict[str, Any]:
    return {"name": load_sweep(sweep_path).name, "source": str(sweep_path.resolve()), "n_tasks": len(specs),
            "tasks": [s.to_dict() for s in specs]}


def read_sweep_snapshot(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The expanded grid stored in a sweep folder (sweep.json), as written by its first task."""
    return read_json(Path(out_dir) / "sweep.json", "sweep snapshot (sweep.json; written by the first array task)")


def write_sweep_snapshot(sweep_path: str | os.PathLike, out_dir: str | os.PathLike,
                         specs: list[TaskSpec] | None = None) -> None:
    """Writes sweep.yaml + sweep.json into `out_dir`, or checks that the ones there describe the same grid.

    Refuses (SweepError) a folder that holds a different grid: its task indices would mean other runs.
    """
    sweep_path, out = Path(sweep_path), Path(out_dir)
    specs = specs if specs is not None else expand_sweep(sweep_path)
    snap = _snapshot(sweep_path, specs)
    # Compare through JSON so tuples/lists and int/float spellings match what is on disk.
    wanted = json.loads(json.dumps(snap["tasks"], default=str))
    existing = out / "sweep.json"
    if existing.exists():
        have = read_sweep_snapshot(out)
        if have.get("tasks") != wanted:
            raise SweepError(f"{out} holds a different sweep ({have.get('source')}, {have.get('n_tasks')} tasks) "
                             f"than {sweep_path} ({len(specs)} tasks): task indices would mean other runs. Use a "
                             f"new sweep folder, or delete {existing} if the old results are not wanted")
        return
    out.mkdir(parents=True, exist_ok=True)
    # Every array task may get here at once: identical content, atomic renames, so any winner is right.
    atomic_write_text(out / "sweep.yaml", sweep_path.read_text())
    atomic_write_json(existing, snap)


def expand_env(value: Any, where: str) -> Any:
    """${VAR} / $VAR in strings (recursively in lists and dicts) from the environment; SweepError if unset."""
    if isinstance(value, str):
        missing = [a or b for a, b in _ENV_VAR.findall(value) if (a or b) not in os.environ]
        if missing:
            raise SweepError(f"{where}: environment variable(s) {', '.join(sorted(set(missing)))} not set "
                             f"(used in {value!r}); export them in the job script or the shell that submits it")
        return os.path.expandvars(value)
    if isinstance(value, list):
        return [expand_env(v, where) for v in value]
    if isinstance(value, dict):
        return {k: expand_env(v, where) for k, v in value.items()}
    return value


def _global_rank() -> int:
    """This process's global rank, by the engine's one rule (phileo.train.dist.detect_layout: under srun,
    SLURM's variables win over a RANK left in the environment)."""
    from phileo.train.dist import detect_layout

    return detect_layout().global_rank


def build_task_config(spec: TaskSpec, run_dir: str | os.PathLike):
    """The FinetuneConfig of one task: its overrides with ${VAR} expanded, run.dir set to `run_dir` (the one
    builder: with a `recipe` key its preset lies under the overrides)."""
    from phileo.bench.config import FinetuneConfig
    from phileo.train.config import build_config

    overrides = {k: expand_env(v, f"sweep task {spec.index} key {k}") for k, v in spec.overrides.items()}
    overrides["run.dir"] = str(run_dir)
    return build_config(FinetuneConfig, overrides=overrides)


@dataclass
class TaskOutcome:
    """What run_sweep_task did: status completed | skipped (already finished) | preempted; result when known."""

    index: int
    status: str
    run_dir: Path
    result: dict[str, Any] | None = None


def run_sweep_task(sweep_path: str | os.PathLike, index: int, out_dir: str | os.PathLike) -> TaskOutcome:
    """Runs array task `index` of the sweep in its own folder task_dir(out_dir, index), in this process.

    Skips a task that already finished. Resumes from the newest checkpoint of an interrupted one (the run folder
    is the same). On failure rank 0 writes failed.json (error and traceback) and the exception propagates, so
    SLURM records the task as FAILED. Returns a TaskOutcome (status 'preempted' when stopped by the pre-timeout
    signal with a checkpoint saved: requeue it). Refuses an index outside the sweep and a sweep folder that
    holds another grid.
    """
    specs = expand_sweep(sweep_path)
    if not 0 <= int(index) < len(specs):
        raise SweepError(f"array task index {index} is outside sweep {sweep_path} (tasks 0..{len(specs) - 1}); "
                         f"the --array range must match the sweep (python -m phileo.bench.sweep array {sweep_path})")
    spec = specs[int(index)]
    run_dir = task_dir(out_dir, index)
    rank0 = _global_rank() == 0
    if rank0:
        write_sweep_snapshot(sweep_path, out_dir, specs)
        _record_own_array(out_dir, sweep_path)
    if task_finished(out_dir, index):
        print(f"sweep task {index} ({spec.name}) already finished: {run_dir / RESULT_FILE}; nothing to do",
              flush=True)
        return TaskOutcome(int(index), "skipped", run_dir, read_json(run_dir / RESULT_FILE, "task result"))
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / FAILED_FILE).unlink(missing_ok=True)  # a re-run replaces the old failure record
        atomic_write_json(run_dir / SPEC_FILE, {**spec.to_dict(), "sweep": str(Path(sweep_path).resolve())})
        link_tensorboard(out_dir, spec)
    try:
        cfg = build_task_config(spec, run_dir)
        from phileo.bench.finetune import run_finetuning

        print(f"sweep task {index}: {spec.name} -> {run_dir}", flush=True)
        result = run_finetuning(cfg)
    except BaseException as e:
        if rank0 and not isinstance(e, KeyboardInterrupt):
            _write_failure(run_dir, spec, e)
        raise
    status = result.status
    if status == "failed":
        if rank0:
            _write_failure(run_dir, spec, RuntimeError(f"fine-tuning failed: {getattr(result, 'message', '')}"))
        raise RuntimeError(f"sweep task {index} ({spec.name}) failed; see {run_dir / FAILED_FILE}")
    payload = read_json(run_dir / RESULT_FILE, "task result") if status == "completed" else None
    return TaskOutcome(int(index), status, run_dir, payload)


TENSORBOARD_DIR = "tensorboard"


def link_tensorboard(out_dir: str | os.PathLike, spec: TaskSpec) -> Path:
    """OUT/tensorboard/<task label> -> ../tasks/NNNNN/tensorboard, so that `tensorboard --logdir OUT/tensorboard`
    names each run by its label (cnn44m_published_roads_n50_lr0.001_s0), not by its index. Replaced atomically."""
    folder = Path(out_dir) / TENSORBOARD_DIR
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / spec.name
    tmp = folder / f".{spec.name}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(task_dir(out_dir, spec.index) / "tensorboard", folder), tmp)
    os.replace(tmp, link)
    return link


def _record_own_array(out_dir: str | os.PathLike, sweep_path: str | os.PathLike) -> None:
    """Under slurm/finetune_array.sh (plain sbatch: no launcher recorded the array) the first task to start records
    its array, whose index k is sweep task k, so that status and re-submission can ask squeue about the rest."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if os.environ.get("PHILEO_SWEEP_LAUNCHER") != "finetune_array.sh" or not array:
        return
    if not (Path(out_dir) / ARRAYS_DIR / f"{array}.json").exists():
        try:
            record_array(out_dir, array, "finetune_array.sh", None, sweep_path, os.environ.get("PHILEO_SITE"))
        except OSError as e:  # status loses its queue view of this array; the task itself is unaffected
            print(f"could not record array {array} in {out_dir}: {e}", file=sys.stderr)


def _write_failure(run_dir: Path, spec: TaskSpec, error: BaseException) -> None:
    record = {
        "index": spec.index, "name": spec.name, "error_type": type(error).__name__, "error": str(error),
        "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__)),
        "host": os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "slurm_array_job_id": os.environ.get("SLURM_ARRAY_JOB_ID"),
        "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        atomic_write_json(run_dir / FAILED_FILE, record)
    except OSError as e:  # the original error matters more than the record of it
        print(f"could not write {run_dir / FAILED_FILE}: {e}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m phileo.bench.sweep", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="run one array task of a sweep")
    p_run.add_argument("sweep", type=Path)
    p_run.add_argument("--out", type=Path, required=True, help="sweep folder (one per sweep)")
    p_run.add_argument("--index", type=int, default=None, help="task index (default: $SLURM_ARRAY_TASK_ID)")
    p_list = sub.add_parser("list", help="print the expanded grid")
    p_list.add_argument("sweep", type=Path)
    p_count = sub.add_parser("count", help="print the number of tasks")
    p_count.add_argument("sweep", type=Path)
    p_array = sub.add_parser("array", help="print the sbatch --array value (with --out: only tasks neither "
                                           "finished nor running nor pending)")
    p_array.add_argument("sweep", type=Path)
    p_array.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "count":
            print(len(expand_sweep(args.sweep)))
        elif args.cmd == "list":
            for s in expand_sweep(args.sweep):
                print(f"{s.index:5d}  {s.name}")
        elif args.cmd == "array":
            sweep = load_sweep(args.sweep)
            indices = (pending_indices(args.sweep, args.out) if args.out
                       else range(len(expand_sweep(args.sweep))))
            if not indices:
                print(f"every task of {args.sweep} has finished in {args.out}, or is running or pending",
                      file=sys.stderr)
                return exit_codes.OK
            print(format_array_spec(indices, sweep.max_parallel))
        elif args.cmd == "run":
            index = args.index
            if index is None:
                env = os.environ.get("SLURM_ARRAY_TASK_ID", "")
                if not env.isdigit():
                    ap.error("--index not given and SLURM_ARRAY_TASK_ID not set (not inside a job array)")
                index = int(env)
            outcome = run_sweep_task(args.sweep, index, args.out)
            if outcome.status == "preempted":
                print(f"sweep task {index} stopped before the time limit with a checkpoint; exit "
                      f"{exit_codes.PREEMPTED} asks for a requeue", flush=True)
                return exit_codes.on_this_rank(exit_codes.PREEMPTED)
    except (SweepError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.REFUSED
    return exit_codes.OK


if __name__ == "__main__":
    sys.exit(main())
