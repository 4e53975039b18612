"""Batch scripts and submitit executors from a site profile and a resolved request.

The same parameters drive both the `--dry-run` text (render_sbatch) and the real submission (`make_executor`
hands them to submitit's SlurmExecutor, which writes the script render_sbatch restates), so what a dry run
prints is exactly what is queued. Every user-provided value reaches the script through `shlex.quote` (submitit quotes #SBATCH
values and srun arguments; we quote what we add); values quoting cannot make safe (line breaks, `%` in paths)
are refused by preflight.

What the generated job does, and why:
- `#SBATCH --ntasks-per-node=<GPUs>` and srun: one task per GPU, ranks from SLURM_PROCID/SLURM_LOCALID.
- `export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK`: since SLURM 22.05 srun does not inherit --cpus-per-task
  from sbatch, and DataLoader workers would all share one core.
- `srun --kill-on-bad-exit=1`: one dead rank ends the step instead of leaving the others hung in a collective.
- `#SBATCH --signal=USR2@<s>` (no `B:`): the pre-timeout signal goes to every task, where the training loop
  turns it into a checkpoint at the next step boundary; `--requeue` lets the job put itself back in the queue.
- `--output/--error` in `<run_dir>/logs/`: the job's stdout/stderr stay with the run.
- the teardown after srun (`failover_lines`): a failed step is retried from the last good checkpoint up to
  --max-failures times in a row, then the run is marked failed (phileo.launch.failover).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

from phileo.launch.resources import JobResources
from phileo.launch.sites import SiteProfile

LOG_DIR_NAME = "logs"

_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def log_folder(run_dir: str | os.PathLike) -> Path:
    """Where a run's batch script, stdout/stderr and submitit pickles go."""
    return Path(run_dir) / LOG_DIR_NAME


def job_environment(site: SiteProfile, extra_env: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The variables every job of this site exports (profile `env`, then `extra_env`)."""
    env = dict(site.env)
    for k, v in (extra_env or {}).items():
        env[str(k)] = str(v)
    return env


# Rank variables of other launchers (torchrun, our local mode) that must not leak into a SLURM job.
STALE_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                   "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


def setup_lines(site: SiteProfile, extra_env: Optional[dict[str, str]] = None) -> list[str]:
    """Shell lines run by the batch script before srun: the site's module/conda lines, then exports.

    Site env values are written in double quotes so that `$SLURM_...` expands on the node (profiles refuse
    quotes, backticks and `$(`); `extra_env` values come from the launcher and are quoted with shlex.
    """
    lines = list(site.setup)
    # sbatch exports the submitting shell's environment: rank variables left there (an earlier torchrun, a
    # notebook) would make every task think it is alone. Each task's rank comes from srun's SLURM_* variables.
    lines.append(f"unset {' '.join(STALE_RANK_VARS)}")
    lines.append("# srun (SLURM >= 22.05) does not inherit --cpus-per-task; without this, workers share one core")
    lines.append('export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"')
    for k, v in site.env.items():
        lines.append(f'export {k}="{v}"')
    for k, v in (extra_env or {}).items():
        lines.append(f"export {k}={shlex.quote(str(v))}")
    return lines


# With the teardown: the ranks leave a failure's retry to it (phileo.launch.jobs.FAILOVER_VARIABLE), and every start
# of the job says so in its log, where the failover's search for this start's cause begins.
FAILOVER_SETUP = ['export PHILEO_FAILOVER=1',
                  'echo "[phileo] job $SLURM_JOB_ID starts on $(hostname) (restart ${SLURM_RESTART_COUNT:-0})" >&2']


def failover_lines(folder: str | os.PathLike, python: Optional[str] = None) -> list[str]:
    """The batch script's teardown: srun's exit status goes to phileo.launch.failover, which retries a failed step
    (a rank killed by -9 or out of memory, the hang watchdog's exit, an exception) from the last good checkpoint
    or records the run as failed; the script then ends with srun's status. `$?` is still srun's here: only blank
    and comment lines stand between the srun line and the first line of the teardown."""
    python = shlex.quote(sys.executable) if python is None else python
    return ['phileo_status=$?',
            '# A failed step is retried from the last good checkpoint, or the run is marked failed (--max-failures)',
            'if [ "$phileo_status" -ne 0 ]; then',
            f'  {python} -m phileo.launch.failover --exit-code "$phileo_status" --submitit-folder '
            f'{shlex.quote(str(folder))}',
            'fi',
            'exit "$phileo_status"',
            '']  # a final newline, as the command block has


def slurm_parameters(site: SiteProfile, res: JobResources, *, extra_env: Optional[dict[str, str]] = None,
                     array_parallelism: Optional[int] = None, dependency: Optional[str] = None,
                     requeue: bool = True, extra_sbatch: Optional[dict[str, Any]] = None,
                     folder: Optional[str | os.PathLike] = None, python: Optional[str] = None) -> dict[str, Any]:
    """Parameters for submitit's SlurmExecutor (its own names), from a resolved request.

    Returns a dict for `SlurmExecutor.update_parameters`; values that are None are left out so SLURM's own
    defaults apply. `dependency` is SLURM syntax (e.g. "afterok:123"). `extra_sbatch` ({"mail-type": "END",
    "exclusive": True}) adds options (--sbatch); submitit shell-quotes their values like every other. With the
    submitit `folder` (and the `python` the job runs with) a job that may requeue gets the failover teardown
    (failover_lines), as every training job the launchers submit does.
    """
    params: dict[str, Any] = {
        "job_name": res.job_name,
        "partition": res.partition,
        "account": res.account,
        "qos": res.qos,
        "nodes": res.nodes,
        "ntasks_per_node": res.tasks_per_node,
        "cpus_per_task": res.cpus_per_task,
        "gres": f"gpu:{res.gpus_per_node}" if res.gpus_per_node else None,
        "mem": res.mem,
        "time": res.time_min,
        "signal_delay_s": res.signal_delay_s,
        "setup": setup_lines(site, extra_env),
        "srun_args": ["--kill-on-bad-exit=1"],
        "dependency": dependency,
        # submitit writes --wckey=submitit by default; sites that track WCKeys would charge it to that name.
        "wckey": None,
        "additional_parameters": {"requeue": True} if requeue else {},
        "teardown": failover_lines(folder, python) if folder is not None and requeue else None,
    }
    if params["teardown"] is not None:
        params["setup"] = params["setup"] + FAILOVER_SETUP
    if dependency:
        # Without it a job whose dependency failed stays pending forever ("DependencyNeverSatisfied").
        params["additional_parameters"]["kill-on-invalid-dep"] = "yes"
    if array_parallelism is not None:
        params["array_parallelism"] = array_parallelism
    params["additional_parameters"].update(extra_sbatch or {})
    return {k: v for k, v in params.items() if v is not None or k == "wckey"}


# The module submitit's executor starts on every task (its public entry point, named by submitit itself in every
# batch script it writes); a dry run must name the same command.
SUBMITIT_ENTRY = "submitit.core._submit"
# Parameters of submitit's SlurmExecutor that are not #SBATCH options.
_NOT_SBATCH = {"setup", "teardown", "signal_delay_s", "stderr_to_stdout", "srun_args", "use_srun",
               "array_parallelism", "additional_parameters"}
# submitit's defaults for the #SBATCH options it always writes.
_SUBMITIT_DEFAULTS = {"job_name": "submitit", "time": 5, "nodes": 1, "wckey": "submitit"}


def submitit_command(folder: str | os.PathLike, python: Optional[str] = None) -> str:
    """The command srun runs on every task (the same string submitit's executor builds)."""
    python = shlex.quote(sys.executable) if python is None else python
    return " ".join([python, "-u -m", SUBMITIT_ENTRY, shlex.quote(str(folder))])


def render_sbatch(params: dict[str, Any], folder: str | os.PathLike, python: Optional[str] = None,
                  map_count: Optional[int] = None) -> str:
    """The batch script submitit's SlurmExecutor writes for these parameters (for --dry-run); submits nothing.

    `map_count` renders the script of a job array of that many tasks. submitit keeps its own renderer private, so
    this restates its format (sorted `#SBATCH --key=value` lines with shell-quoted values, the USR2 signal, the
    %j/%A_%a log paths, setup, srun, teardown); tests/test_launch_scripts.py checks it byte for byte against the
    script submitit writes, for every parameter the launchers set, so a submitit upgrade that changes the format
    fails there rather than making dry runs lie.
    """
    from submitit.core.utils import JobPaths

    params = {**_SUBMITIT_DEFAULTS, **params}
    options = {k: v for k, v in params.items() if v is not None and k not in _NOT_SBATCH}
    options["signal"] = f"USR2@{params.get('signal_delay_s', 90)}"
    paths = JobPaths(folder=str(folder))
    stdout, stderr = str(paths.stdout), str(paths.stderr)
    if map_count is not None:
        options["array"] = f"0-{map_count - 1}%{min(map_count, params.get('array_parallelism', 256))}"
        stdout, stderr = stdout.replace("%j", "%A_%a"), stderr.replace("%j", "%A_%a")
    options["output"] = stdout.replace("%t", "0")
    if not params.get("stderr_to_stdout"):
        options["error"] = stderr.replace("%t", "0")
    options["open-mode"] = "append"
    options.update(params.get("additional_parameters") or {})
    lines = ["#!/bin/bash", "", "# Parameters"]
    for key in sorted(options):
        flag = key.replace("_", "-")
        lines.append(f"#SBATCH --{flag}" if options[key] is True else f"#SBATCH --{flag}={shlex.quote(str(options[key]))}")
    if params.get("setup") is not None:
        lines += ["", "# setup", *params["setup"]]
    command = submitit_command(folder, python)
    if params.get("use_srun", True):
        stderr_flags = [] if params.get("stderr_to_stdout") else ["--error", stderr]
        srun = ["srun", "--unbuffered", "--output", stdout, *stderr_flags, *(params.get("srun_args") or [])]
        command = " ".join(shlex.quote(a) for a in srun) + " " + command
    lines += ["", "# command", "export SUBMITIT_EXECUTOR=slurm", command, ""]
    if params.get("teardown") is not None:
        lines += ["", "# teardown", *params["teardown"]]
    return "\n".join(lines)


def make_slurm_executor(folder: str | os.PathLike, params: dict[str, Any], max_requeues: int,
                        python: Optional[str] = None):
    """A submitit SlurmExecutor writing into `folder` with `params` (from `slurm_parameters`)."""
    import submitit

    Path(folder).mkdir(parents=True, exist_ok=True)
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=max_requeues, python=python)
    ex.update_parameters(**params)
    return ex


def local_environment(site: SiteProfile, res: JobResources,
                      extra_env: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The site env for local processes: `$SLURM_CPUS_PER_TASK` and friends replaced by the request's values."""
    slurm_like = {"SLURM_CPUS_PER_TASK": str(res.cpus_per_task), "SLURM_NTASKS": str(res.num_tasks),
                  "SLURM_JOB_NUM_NODES": "1"}

    def expand(v: str) -> str:
        return _VAR.sub(lambda m: slurm_like.get(m.group(1), os.environ.get(m.group(1), "")), v)

    return {k: expand(v) for k, v in job_environment(site, extra_env).items()}


def make_local_executor(folder: str | os.PathLike, res: JobResources, max_requeues: int, use_gpus: bool):
    """A submitit LocalExecutor: `res.tasks_per_node` processes on this machine, same callable, same requeue."""
    import submitit

    Path(folder).mkdir(parents=True, exist_ok=True)
    ex = submitit.LocalExecutor(folder=folder, max_num_timeout=max_requeues)
    ex.update_parameters(timeout_min=res.time_min, tasks_per_node=res.tasks_per_node,
                         gpus_per_node=res.tasks_per_node if use_gpus else 0,
                         signal_delay_s=res.signal_delay_s)
    return ex
