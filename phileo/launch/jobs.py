"""The callables a launcher submits: the same objects run on SLURM and in local processes.

`PretrainJob` (and `FinetuneJob`) are submitit `Checkpointable`s, which makes requeue a property of the job, not
of the launcher. How one walltime limit is survived:

1. SLURM sends USR2 to every task `signal_delay_s` before the limit (`#SBATCH --signal=USR2@<s>`).
2. The training engine has replaced submitit's handler with a flag-only one (submitit's would checkpoint on rank
   0 alone, inside the handler, which a ZeRO checkpoint cannot do): at the next step boundary all ranks agree to
   stop, save a checkpoint together, and `run_pretraining` returns status "preempted".
3. Here, global rank 0 writes the resubmission (this job with its requeue count + 1) where submitit reads it,
   and asks the scheduler to requeue (`scontrol requeue`; locally, submitit's controller restarts the tasks). It
   then exits without a result, so nobody mistakes the job for finished. Other ranks return quietly: a non-zero
   exit would trip `srun --kill-on-bad-exit`.
4. The requeued job runs the same callable, whose training resumes from the newest checkpoint in run.dir.

After `max_requeues` requeues the job ends with status "preempted" and says how to continue (`--resume`).
Should the signal arrive before the engine has installed its handler, submitit's own handler calls
`checkpoint()` below, which applies the same bound.
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
import zlib
from typing import Any, Optional, Sequence

import submitit
from submitit.core.utils import DelayedSubmission, temporary_save_path

log = logging.getLogger("phileo.launch")

PREEMPTED = "preempted"


def export_local_rank_env(env: Any) -> dict[str, str]:
    """Sets torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR ...) for a local submitit task.

    On SLURM the engine reads SLURM_PROCID & co. itself; local processes have only submitit's variables, so
    they get the torchrun ones. The port is derived from the job id so that concurrent local jobs differ.
    Returns what was set.
    """
    port = 20000 + zlib.crc32(str(env.job_id).encode()) % 30000
    values = {
        "RANK": str(env.global_rank),
        "LOCAL_RANK": str(env.local_rank),
        "WORLD_SIZE": str(env.num_tasks),
        "LOCAL_WORLD_SIZE": str(env.num_tasks),
        "NODE_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": os.environ.get("PHILEO_LOCAL_MASTER_PORT", str(port)),
    }
    os.environ.update(values)
    return values


def _import(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


class RequeueOnPreemption(submitit.helpers.Checkpointable):
    """Base of the jobs that requeue themselves when their work reports status "preempted".

    Subclasses implement `run()` (returns an object with `.status`) and `resubmission()` (a copy with
    `requeue_count + 1`), and set `max_requeues` / `requeue_count`.
    """

    max_requeues: int = 10
    requeue_count: int = 0
    how_to_continue: str = "re-submit the same command"

    def run(self) -> Any:
        raise NotImplementedError

    def resubmission(self) -> "RequeueOnPreemption":
        raise NotImplementedError

    def __call__(self) -> Any:
        env = submitit.JobEnvironment()
        if env.cluster == "local":
            export_local_rank_env(env)
        result = self.run()
        if getattr(result, "status", None) == PREEMPTED:
            self._requeue_or_stop(env, result)
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> Optional[DelayedSubmission]:
        """Called by submitit's own signal handler (rank 0 only); None refuses the requeue when the bound is hit."""
        if self.requeue_count >= self.max_requeues:
            return None
        return DelayedSubmission(self.resubmission())

    def _requeue_or_stop(self, env: Any, result: Any) -> None:
        if env.global_rank != 0:
            return  # rank 0 decides; a quiet return keeps srun --kill-on-bad-exit out of it
        step = getattr(result, "step", "?")
        if self.requeue_count >= self.max_requeues:
            print(f"[phileo.launch] job {env.job_id} preempted at step {step} and NOT requeued: it already "
                  f"requeued {self.requeue_count} times (max_requeues={self.max_requeues}). To go on, "
                  f"{self.how_to_continue}.", file=sys.stderr, flush=True)
            return
        paths = env.paths
        delayed = DelayedSubmission(self.resubmission())
        try:
            previous = DelayedSubmission.load(paths.submitted_pickle)
            delayed.set_timeout(previous._timeout_min, previous._timeout_countdown)
        except Exception:  # an unreadable pickle: keep submitit's defaults, the requeue still works
            pass
        with temporary_save_path(paths.submitted_pickle) as tmp:
            delayed.dump(tmp)
        print(f"[phileo.launch] job {env.job_id} preempted at step {step}: checkpoint written, requeueing "
              f"({self.requeue_count + 1}/{self.max_requeues}); the requeued job resumes from it.",
              file=sys.stderr, flush=True)
        try:
            env._requeue(self.max_requeues - self.requeue_count - 1)  # local executor: exits with its requeue code
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            # scancel'ed jobs cannot be requeued: the checkpoint is written, so report and end normally.
            print(f"[phileo.launch] job {env.job_id}: requeue refused ({e}); the checkpoint at step {step} is "
                  f"kept: to go on, {self.how_to_continue}.", file=sys.stderr, flush=True)
            return
        # No result pickle for this run: the job is not over. SystemExit passes submitit's `except Exception`.
        raise SystemExit(0)


class TrainingJob(RequeueOnPreemption):
    """Runs `entry(config)` (e.g. phileo.train.pretrain:run_pretraining) and requeues itself on preemption.

    Takes the entry point and config class as "module:name" strings and the config as a plain dict (so the
    pickle does not hold library objects), `max_requeues` (how often this job may put itself back in the queue)
    and `requeue_count` (how often it already has). Calling it returns the entry point's result (an object with
    `status`, "completed" | "preempted" | "failed"); on rank 0 of a preempted job that can still requeue it does
    not return but exits after requeueing.
    """

    def __init__(self, entry: str, config_class: str, config: dict[str, Any], max_requeues: int = 10,
                 requeue_count: int = 0):
        self.entry = entry
        self.config_class = config_class
        self.config = config
        self.max_requeues = int(max_requeues)
        self.requeue_count = int(requeue_count)
        run_dir = (config.get("run") or {}).get("dir", "RUN_DIR")
        self.how_to_continue = f"resubmit with --resume {run_dir}"

    def build_config(self) -> Any:
        from phileo.config import from_dict, validate

        cfg = from_dict(_import(self.config_class), self.config)
        validate(cfg)
        return cfg

    def run(self) -> Any:
        return _import(self.entry)(self.build_config())

    def resubmission(self) -> "TrainingJob":
        """This job as the requeued run will execute it (one more requeue counted)."""
        return type(self)(self.entry, self.config_class, self.config, self.max_requeues, self.requeue_count + 1)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(entry={self.entry!r}, requeue_count={self.requeue_count}, "
                f"max_requeues={self.max_requeues})")


class PretrainJob(TrainingJob):
    """`phileo.train.pretrain.run_pretraining(PretrainConfig)` as a requeueing submitit job.

    Takes the config as a dict (`phileo.config.to_dict(cfg)`), `max_requeues`, `requeue_count`.
    """

    ENTRY = "phileo.train.pretrain:run_pretraining"
    CONFIG_CLASS = "phileo.train.config:PretrainConfig"

    def __init__(self, config: dict[str, Any], max_requeues: int = 10, requeue_count: int = 0,
                 entry: Optional[str] = None, config_class: Optional[str] = None):
        super().__init__(entry or self.ENTRY, config_class or self.CONFIG_CLASS, config, max_requeues,
                         requeue_count)

    def resubmission(self) -> "PretrainJob":
        return PretrainJob(self.config, self.max_requeues, self.requeue_count + 1, self.entry, self.config_class)


class FinetuneJob(TrainingJob):
    """`phileo.bench.finetune.run_finetuning(FinetuneConfig)` as a requeueing submitit job (one fine-tuning run)."""

    ENTRY = "phileo.bench.finetune:run_finetuning"
    CONFIG_CLASS = "phileo.bench.config:FinetuneConfig"

    def __init__(self, config: dict[str, Any], max_requeues: int = 10, requeue_count: int = 0,
                 entry: Optional[str] = None, config_class: Optional[str] = None):
        super().__init__(entry or self.ENTRY, config_class or self.CONFIG_CLASS, config, max_requeues,
                         requeue_count)

    def resubmission(self) -> "FinetuneJob":
        return FinetuneJob(self.config, self.max_requeues, self.requeue_count + 1, self.entry, self.config_class)


class SweepTaskJob(RequeueOnPreemption):
    """Task `index` of a sweep (phileo.bench.sweep.run_sweep_task) as one element of a job array.

    Takes the sweep file, the task's index in the expanded grid, the sweep folder, `max_requeues` and
    `requeue_count`. The index travels with the job (not through SLURM_ARRAY_TASK_ID), so an array made of only
    the unfinished tasks, or split to respect MaxArraySize, still runs the right ones. Returns the TaskOutcome;
    a failed task raises (SLURM and the result pickle record it; failed.json in its folder holds the traceback).
    """

    def __init__(self, sweep_path: str, index: int, out_dir: str, max_requeues: int = 3, requeue_count: int = 0):
        self.sweep_path = str(sweep_path)
        self.index = int(index)
        self.out_dir = str(out_dir)
        self.max_requeues = int(max_requeues)
        self.requeue_count = int(requeue_count)
        self.how_to_continue = (f"resubmit the sweep (python jobs/launch_sweep.py {self.sweep_path} --out "
                                f"{self.out_dir}): finished tasks are skipped")

    def run(self) -> Any:
        from phileo.bench.sweep import run_sweep_task

        return run_sweep_task(self.sweep_path, self.index, self.out_dir)

    def resubmission(self) -> "SweepTaskJob":
        return SweepTaskJob(self.sweep_path, self.index, self.out_dir, self.max_requeues, self.requeue_count + 1)

    def __repr__(self) -> str:
        return f"SweepTaskJob({self.sweep_path!r}, index={self.index}, requeue_count={self.requeue_count})"


class CommandJob:
    """Runs one command line (a converter slice, a merge) in a child process; raises when it fails.

    Takes the argv list. Its stdout/stderr go straight to the task's log (no buffering into memory). Returns
    the exit code (0); refuses (CalledProcessError) a non-zero one so that the job counts as failed and a
    dependent `afterok` job does not start.
    """

    def __init__(self, argv: Sequence[str], cwd: Optional[str] = None):
        self.argv = [str(a) for a in argv]
        self.cwd = cwd

    def __call__(self) -> int:
        print("[phileo.launch] running: " + " ".join(self.argv), file=sys.stderr, flush=True)
        subprocess.run(self.argv, check=True, cwd=self.cwd)
        return 0

    def __repr__(self) -> str:
        return f"CommandJob({self.argv!r})"
