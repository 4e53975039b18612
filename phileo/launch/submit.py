"""Submitting a callable to SLURM or to local processes, recording it, and waiting for it honestly.

The cluster is a parameter, not a code path: `build_executor("slurm" | "local", ...)` returns a submitit executor
and everything after that (submit, requeue, wait, read the result) is the same. Waiting never relies on
submitit's `result()`, which hangs when a job dies before writing its result and no accounting database is
available: on SLURM we ask `squeue` whether any part of the job (requeues included) is alive, locally we watch
the controller process.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from phileo.config import ConfigError
from phileo.fsutil import atomic_write_json, make_group_readable, read_json
from phileo.launch.resources import JobResources
from phileo.launch.scripts import (local_environment, make_local_executor, make_slurm_executor, render_sbatch,
                                   slurm_parameters)
from phileo.launch.sites import SiteProfile
from phileo.launch.slurm import have_sbatch, job_active

LAUNCH_RECORD = "launch.json"


def resolve_cluster(cluster: str, site: SiteProfile, nodes: int = 1, dry_run: bool = False) -> str:
    """Where the job goes: 'slurm' or 'local'. Refuses (ConfigError) what cannot happen here.

    'auto' is slurm when sbatch is on PATH; without it, local only for a one-node job of a site with
    `local_fallback` (the laptop/dev profile), so a cluster's job, and any multi-node job, is never turned into
    local processes. A dry run never needs SLURM: it renders the SLURM script on any machine. A real submission
    to SLURM without sbatch is refused.
    """
    if cluster not in ("slurm", "local", "auto"):
        raise ConfigError(f"--cluster must be slurm, local or auto, got {cluster!r}")
    if cluster == "auto":
        if have_sbatch():
            return "slurm"
        cluster = "local" if site.local_fallback and nodes == 1 else "slurm"
    if cluster == "slurm" and not dry_run and not have_sbatch():
        raise ConfigError(f"site {site.name} jobs go to SLURM, and `sbatch` is not on PATH here: submit from the "
                          f"site's login node (add --dry-run to see the job here){_local_hint(site, nodes)}")
    return cluster


def _local_hint(site: SiteProfile, nodes: int) -> str:
    return ", or use --cluster local --nodes 1 for local processes" if site.local_fallback or nodes == 1 else ""


def check_local_request(res: JobResources, sbatch_options: bool = False) -> list[str]:
    """What a local (no SLURM) run cannot do."""
    problems = []
    if res.nodes != 1:
        problems.append(f"--cluster local runs on this one machine: use --nodes 1 (got {res.nodes}); "
                        f"--gpus-per-node N starts N processes")
    if sbatch_options:
        problems.append("--sbatch, --after and --dependency are SLURM options: drop them with --cluster local")
    return problems


def local_uses_gpus(n_tasks: int) -> bool:
    """True when this machine has at least one GPU per local task."""
    try:
        import torch

        return torch.cuda.is_available() and torch.cuda.device_count() >= n_tasks
    except Exception:
        return False


@contextlib.contextmanager
def patched_environ(values: dict[str, str]) -> Iterator[None]:
    """Sets variables for child processes started inside the block, then restores the parent's environment."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class Plan:
    """One job ready to go: where it runs, what it asks for, and the batch script (SLURM) it would submit."""

    cluster: str
    site: SiteProfile
    resources: JobResources
    folder: Path  # submitit folder: batch script, logs, pickles
    slurm_params: Optional[dict[str, Any]] = None
    extra_env: Optional[dict[str, str]] = None
    python: Optional[str] = None

    def script(self, map_count: Optional[int] = None) -> str:
        """The sbatch script (SLURM), or a description of the local processes."""
        if self.cluster == "slurm":
            return render_sbatch(self.slurm_params, self.folder, self.python, map_count=map_count)
        env = local_environment(self.site, self.resources, self.extra_env)
        lines = [f"# --cluster local: {self.resources.tasks_per_node} local process(es) on this machine, "
                 f"time limit {self.resources.time_min} min (USR2 {self.resources.signal_delay_s} s before it)",
                 f"# logs in {self.folder}"]
        lines += [f"export {k}={v}" for k, v in env.items()]
        return "\n".join(lines) + "\n"

    def executor(self):
        if self.cluster == "slurm":
            return make_slurm_executor(self.folder, self.slurm_params, self.resources.max_requeues, self.python)
        return make_local_executor(self.folder, self.resources, self.resources.max_requeues,
                                   use_gpus=local_uses_gpus(self.resources.tasks_per_node))

    def local_env(self) -> dict[str, str]:
        return local_environment(self.site, self.resources, self.extra_env) if self.cluster == "local" else {}


def make_plan(cluster: str, site: SiteProfile, res: JobResources, folder: Path, *,
              extra_env: Optional[dict[str, str]] = None, array_parallelism: Optional[int] = None,
              dependency: Optional[str] = None, requeue: bool = True, python: Optional[str] = None,
              extra_sbatch: Optional[dict[str, Any]] = None) -> Plan:
    params = None
    if cluster == "slurm":
        params = slurm_parameters(site, res, extra_env=extra_env, array_parallelism=array_parallelism,
                                  dependency=dependency, requeue=requeue, extra_sbatch=extra_sbatch,
                                  folder=folder, python=python)
    return Plan(cluster, site, res, Path(folder), params, extra_env, python)


def submit(plan: Plan, fn: Any) -> Any:
    """Submits one callable; returns the submitit job."""
    ex = plan.executor()
    with patched_environ(plan.local_env()):
        return ex.submit(fn)


def submit_array(plan: Plan, fns: list[Any]) -> list[Any]:
    """Submits callables as one job array (SLURM `--array=0-(N-1)%K`); locally, one process group each."""
    ex = plan.executor()
    with patched_environ(plan.local_env()):
        if plan.cluster == "slurm":
            return ex.submit_array(fns)
        return [ex.submit(f) for f in fns]


def base_job_id(job_id: str) -> str:
    """'123_4' (array task) -> '123'; the id squeue accepts for the whole job."""
    return str(job_id).split("_", 1)[0]


def job_is_active(job: Any) -> bool:
    """Whether any part of the job (array tasks and requeues included) may still run."""
    if type(job).__name__ == "LocalJob":
        return job.get_info().get("jobState") == "RUNNING"
    return job_active(job.job_id)  # squeue takes "123" and array tasks "123_4" alike


def read_task_result(job: Any, task: int = 0) -> Optional[tuple[str, Any]]:
    """("success", value) or ("error", traceback text) from the task's result pickle; None when it wrote none."""
    if task >= job.num_tasks:
        return None
    path = job.task(task).paths.result_pickle
    if not path.exists():
        return None
    with open(path, "rb") as fh:
        return pickle.load(fh)


def wait_for(jobs: list[Any], timeout_s: Optional[float] = None, poll_s: float = 5.0,
             on_poll: Any = None) -> None:
    """Blocks until no part of any job is active (requeues included). TimeoutError after `timeout_s`."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while any(job_is_active(j) for j in jobs):
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job(s) {', '.join(str(j.job_id) for j in jobs)} still active after {timeout_s:.0f} s")
        if on_poll is not None:
            on_poll()
        time.sleep(poll_s)
    # A result pickle is renamed into place just before the process exits; allow for file-system lag.
    grace = time.monotonic() + 5.0
    while time.monotonic() < grace and any(read_task_result(j) is None for j in jobs):
        time.sleep(0.5)


def update_launch_record(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Merges `fields` into <run_dir>/launch.json (atomic); `job_ids` are appended, not replaced."""
    path = Path(run_dir) / LAUNCH_RECORD
    record: dict[str, Any] = read_json(path, "launch record") if path.exists() else {}
    new_ids = fields.pop("job_ids", [])
    record.update(fields)
    record["job_ids"] = list(record.get("job_ids", [])) + [str(j) for j in new_ids]
    record["updated_at"] = _dt.datetime.now().isoformat(timespec="seconds")
    atomic_write_json(path, record)
    return record


def read_launch_record(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / LAUNCH_RECORD
    return read_json(path, "launch record") if path.exists() else {}


def prepare_run_dir(run_dir: Path) -> None:
    """Creates the run folder and its log folder, readable by the project group."""
    for d in (run_dir, run_dir / "logs"):
        d.mkdir(parents=True, exist_ok=True)
        make_group_readable(d, directory=True)


# What a rank's log says when a job ended without a result, most telling first. SLURM's "*** JOB 12 ... CANCELLED /
# DUE TO TIME LIMIT ***" ends the whole job; a "*** STEP 12.0 ... CANCELLED ***" line is only srun
# --kill-on-bad-exit ending the other ranks after the one that failed, so it is no cause.
_CAUSES = ("No space left on device", "Timeout (", "RunLocked", "CUDA out of memory", "MemoryError",
           "OutOfMemory", "oom-kill", "Killed", "*** JOB ", "Traceback (most recent call last)")


# The first log line of every start of a job (a requeued job appends to the same log files): submitit's, and the
# one slurm/pretrain.sbatch and slurm/finetune_array.sh print.
START_MARKERS = ("Starting with JobEnvironment", "(restart ")


def rank_log_cause(log_dir: Path, max_lines: int = 3, job_id: Optional[str] = None,
                   since: Optional[float] = None) -> Optional[str]:
    """The lines of the job's rank logs (every file under `log_dir`, read whole, not a tail) that say why it
    ended: a full disk, the hang watchdog's "Timeout", an OOM, a kill, else the last exception line. With
    `job_id`, only that job's files ("<job_id>_<rank>_log.*", or the plain scripts' "<job_id>.out") and in each
    only what its last start wrote (after the last START_MARKERS line), so an earlier start's cause is not
    reported again; `since` (a POSIX time: when this start began) leaves out files not written since. None
    when nothing telling is found."""
    files = sorted(Path(log_dir).glob(f"{job_id}[._]*" if job_id else "**/*"))
    return log_cause(files, max_lines, last_start_only=job_id is not None, since=since)


def log_cause(files: Iterable[Path], max_lines: int = 3, last_start_only: bool = False,
              since: Optional[float] = None) -> Optional[str]:
    """rank_log_cause over given log files (.out .err .txt .log)."""
    hits: list[tuple[int, str]] = []
    for f in files:
        if not f.is_file() or f.suffix not in (".out", ".err", ".txt", ".log"):
            continue
        try:
            if since is not None and f.stat().st_mtime < since - 1:
                continue  # a rank that wrote nothing in this start: its file is an earlier start's
            lines = f.read_text(errors="replace").splitlines()
        except OSError:
            continue
        if last_start_only:
            starts = [i for i, line in enumerate(lines) if any(m in line for m in START_MARKERS)]
            lines = lines[starts[-1]:] if starts else lines
        for i, line in enumerate(lines):
            for rank, pattern in enumerate(_CAUSES):
                if pattern in line:
                    text = line.strip()
                    if pattern.startswith("Traceback"):  # the exception itself is the traceback's last line
                        text = next((x.strip() for x in lines[i + 1:] if x and not x.startswith((" ", "\t"))),
                                    text)
                    hits.append((rank, f"{f.name}: {text[:300]}"))
    if not hits:
        return None
    best = min(r for r, _ in hits)
    chosen = [t for r, t in hits if r == best]
    return "; ".join(dict.fromkeys(chosen[-max_lines:]))

