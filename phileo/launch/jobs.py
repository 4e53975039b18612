"""The one callable every launcher submits: `TrainingJob(kind, payload)`, the same object on SLURM and locally.

A job kind (`JOB_KINDS`: pretrain, finetune, sweep_task, preprocess_task) says what the job calls
("module:function"), how its payload becomes the call's arguments (a config dict built into a validated config
class, or keyword arguments), whether the job requeues itself when the work reports status "preempted", and what
a user does to continue it. A kind is plain strings and travels inside the job's pickle, so nothing of the
library is pickled and a new kind (a test's stand-in entry point) needs no registration in the job's process.

`TrainingJob` is a submitit `Checkpointable`: requeue is a property of the callable, not of the launcher. How
one walltime limit is survived:

1. SLURM sends USR2 to every task `signal_delay_s` before the limit (`#SBATCH --signal=USR2@<s>`).
2. The training engine has replaced submitit's handler with a flag-only one (submitit's would checkpoint on rank
   0 alone, inside the handler, which a ZeRO checkpoint cannot do): at the next step boundary all ranks agree to
   stop, save a checkpoint together, and the entry point returns status "preempted".
3. Here, global rank 0 puts the resubmission (this job with its requeue count + 1) into the submission pickle
   submitit reads when the job starts again, and asks for the requeue (`request_requeue`: `scontrol requeue
   JOB_ID` on SLURM; on submitit's local executor the exit status its controller restarts the tasks on). It then
   exits with status PREEMPTED and no result, so nobody mistakes the job for finished. Other ranks return
   quietly: a non-zero exit would trip `srun --kill-on-bad-exit`.
4. The requeued job runs the same callable, whose work resumes from the newest checkpoint in its run folder.

A failure that is not a preemption (an exception, a rank killed by -9 or out of memory, the hang watchdog's exit)
is retried from the last good checkpoint up to `max_failures` times in a row, then the run's state.json says
"failed" (phileo.launch.failover: on SLURM the batch script's teardown decides after the srun step, since a killed
rank cannot; on submitit's local executor this callable does, on an exception).

After `max_requeues` requeues the job ends with status "preempted" and says how to continue. Should the signal
arrive before the engine has installed its handler, submitit's own handler calls `checkpoint()` below, which
applies the same bound. Only submitit's public API is used (Checkpointable, JobEnvironment, DelayedSubmission);
the requeue request itself is our own code (submitit's is private).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import submitit
from submitit.helpers import DelayedSubmission

from phileo import exit_codes
from phileo.fsutil import atomic_path

PREEMPTED = "preempted"
# Set (to "1") by every batch script whose teardown runs phileo.launch.failover after srun: the ranks then leave a
# failure's retry to it.
FAILOVER_VARIABLE = "PHILEO_FAILOVER"

# The variables of an srun step this process may have been started inside (`srun --pty bash`, then a local
# launch): they describe that outer step, not the local tasks, and would otherwise place them (phileo.train.dist).
OUTER_STEP_VARIABLES = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_STEP_ID", "SLURM_STEPID")


@dataclass(frozen=True)
class JobKind:
    """What a TrainingJob runs.

    entry: "module:function" called with the payload; config_class: "module:Class" when the payload is
    {"config": dict} (built with phileo.config.from_dict, validated, passed as the one argument), None when the
    payload holds the keyword arguments; requeue: whether a "preempted" result puts the job back in the queue;
    how_to_continue: what a user does to go on, formatted with the payload (`{config[run][dir]}`).
    """

    name: str
    entry: str
    config_class: Optional[str] = None
    requeue: bool = True
    how_to_continue: str = "re-submit the same command"

    def call(self, payload: Mapping[str, Any]) -> Any:
        fn = _import(self.entry)
        if self.config_class is None:
            return fn(**payload)
        from phileo.config import from_dict, validate

        cfg = from_dict(_import(self.config_class), dict(payload["config"]))
        validate(cfg)
        return fn(cfg)

    def continue_hint(self, payload: Mapping[str, Any]) -> str:
        try:
            return self.how_to_continue.format(**payload)
        except (KeyError, IndexError, TypeError):  # a payload without the field (a stand-in config): say it plainly
            return "re-submit the same command"


JOB_KINDS: dict[str, JobKind] = {kind.name: kind for kind in (
    JobKind("pretrain", "phileo.train.pretrain:run_pretraining", "phileo.train.config:PretrainConfig",
            how_to_continue="resubmit with --resume {config[run][dir]}"),
    JobKind("finetune", "phileo.bench.finetune:run_finetuning", "phileo.bench.config:FinetuneConfig",
            how_to_continue="resubmit the same command (same --run-dir {config[run][dir]}): it resumes from the "
                            "newest checkpoint"),
    JobKind("sweep_task", "phileo.bench.sweep:run_sweep_task",
            how_to_continue="resubmit the sweep (python jobs/launch_sweep.py {sweep_path} --out {out_dir}): "
                            "finished tasks are skipped"),
    # A converter slice or merge: a plain command line; not requeued (a failed stage must cancel the next).
    JobKind("preprocess_task", "phileo.launch.jobs:run_command", requeue=False),
)}


def job_kind(kind: Union[str, JobKind]) -> JobKind:
    """The registered kind of that name (or `kind` itself). Refuses an unknown name, listing the known ones."""
    if isinstance(kind, JobKind):
        return kind
    try:
        return JOB_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown job kind {kind!r}: use one of {', '.join(JOB_KINDS)}") from None


def _import(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def run_command(argv: Sequence[str], cwd: Optional[str] = None) -> int:
    """Runs one command line (a converter slice, a merge) in a child process; its output goes straight to the
    task's log. Returns 0; refuses (CalledProcessError) a non-zero exit, so that the job counts as failed and a
    dependent `afterok` job does not start."""
    argv = [str(a) for a in argv]
    print("[phileo.launch] running: " + " ".join(argv), file=sys.stderr, flush=True)
    subprocess.run(argv, check=True, cwd=cwd)
    return 0


def export_local_rank_env(env: Any) -> dict[str, str]:
    """Sets torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR ...) for a local submitit task.

    On SLURM the engine reads SLURM_PROCID & co. itself; local processes have only submitit's variables, so
    they get the torchrun ones, and an outer srun step's placement variables are removed (under srun they
    would win, phileo.train.dist). The port is derived from the job id so that concurrent local jobs differ.
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
    for name in OUTER_STEP_VARIABLES:
        os.environ.pop(name, None)
    os.environ.update(values)
    return values


class RequeueRefused(RuntimeError):
    """The scheduler would not put the job back in the queue (e.g. it was scancel'ed)."""


def request_requeue(cluster: str, job_id: str) -> None:
    """Asks for this running job to be queued again; the process is ended by the scheduler or the caller.

    On SLURM: `scontrol requeue JOB_ID` (an array task's id "123_4" included); it raises RequeueRefused with
    scontrol's message when refused. Locally (submitit's LocalExecutor): exits at once with LOCAL_REQUEUE, on
    which submitit's controller restarts all the tasks. Other executors (debug) cannot requeue: RequeueRefused.
    """
    if cluster == "local":
        raise SystemExit(exit_codes.LOCAL_REQUEUE)
    if cluster != "slurm":
        raise RequeueRefused(f"the {cluster!r} executor has no queue to requeue into")
    try:
        subprocess.run(["scontrol", "requeue", str(job_id)], check=True, capture_output=True, text=True,
                       timeout=60)
    except subprocess.CalledProcessError as e:
        raise RequeueRefused(f"scontrol requeue {job_id}: {(e.stderr or e.stdout or '').strip() or e}") from None
    except (subprocess.TimeoutExpired, OSError) as e:
        raise RequeueRefused(f"scontrol requeue {job_id}: {e}") from None


def save_resubmission(submitted_pickle: Path, job: Any) -> None:
    """Makes `job` what the next start of this submitit job runs: submitit's own submission record with its
    function replaced (its timeout settings stay as submitit wrote them), written atomically."""
    try:
        delayed = DelayedSubmission.load(submitted_pickle)
        delayed.function = job
    except Exception:  # an unreadable record: a fresh one still restarts the job (with submitit's defaults)
        delayed = DelayedSubmission(job)
    with atomic_path(submitted_pickle) as tmp:
        delayed.dump(tmp)


class TrainingJob(submitit.helpers.Checkpointable):
    """One job of any kind (see JOB_KINDS) as a submitit callable that requeues itself on preemption.

    Takes the kind (a name or a JobKind), the payload (plain data: {"config": dict} or the entry's keyword
    arguments, so the pickle holds no library objects), `max_requeues` (how often this job may put itself back
    in the queue) and `requeue_count` (how often it already has). Calling it returns the entry point's result
    (for training an object with `status`: "completed" | "preempted" | "failed"); on rank 0 of a preempted job
    that can still requeue it does not return but exits with status PREEMPTED after asking for the requeue.
    """

    def __init__(self, kind: Union[str, JobKind], payload: Mapping[str, Any], max_requeues: int = 10,
                 requeue_count: int = 0, max_failures: int = 3):
        self.kind = job_kind(kind)
        self.payload = dict(payload)
        self.max_requeues = int(max_requeues)
        self.requeue_count = int(requeue_count)
        # Failures are counted in the run's state.json (phileo.launch.failover), not here: on SLURM the batch
        # script counts the ones no Python code of the job survives (kill -9, OOM, the hang watchdog).
        self.max_failures = int(max_failures)

    @property
    def how_to_continue(self) -> str:
        return self.kind.continue_hint(self.payload)

    @property
    def can_requeue(self) -> bool:
        return self.kind.requeue and self.requeue_count < self.max_requeues

    @property
    def run_dir(self) -> Optional[Path]:
        """The run folder this job trains in (state.json lives there); None for a kind without one."""
        if "config" in self.payload:
            cfg = self.payload["config"]
            run = cfg.get("run")
            d = run.get("dir") if isinstance(run, dict) else cfg.get("dir")  # a job config, or a flat one
            return Path(d) if d else None
        if "out_dir" in self.payload and "index" in self.payload:
            from phileo.bench.sweep import task_dir

            return task_dir(self.payload["out_dir"], self.payload["index"])
        return None

    def _record(self, state: str, detail: str, **fields: Any) -> None:
        """state.json of the run (status command); never fails the job."""
        if self.run_dir is None or not self.run_dir.is_dir():
            return
        from phileo.run_state import update_state

        try:
            update_state(self.run_dir, state, event=state, detail=detail, **fields)
        except (OSError, ValueError) as e:
            print(f"[phileo.launch] could not update {self.run_dir / 'state.json'}: {e}", file=sys.stderr)

    def resubmission(self) -> "TrainingJob":
        """This job as the requeued run will execute it (one more requeue counted)."""
        return TrainingJob(self.kind, self.payload, self.max_requeues, self.requeue_count + 1, self.max_failures)

    def __call__(self) -> Any:
        env = submitit.JobEnvironment()
        if env.cluster == "local":
            export_local_rank_env(env)
        # A result an earlier start of this job left (an exception that was then retried) is not this start's:
        # a waiting launcher must not read it while the retry runs.
        env.paths.result_pickle.unlink(missing_ok=True)
        try:
            result = self.kind.call(self.payload)
        except Exception as e:
            if self.kind.requeue:
                self._on_failure(env, e)
            raise
        if self.kind.requeue and getattr(result, "status", None) == PREEMPTED:
            self._requeue_or_stop(env, result)
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> Optional[DelayedSubmission]:
        """Called by submitit's own signal handler (rank 0 only); None refuses the requeue (bound hit, or a kind
        that does not requeue)."""
        return DelayedSubmission(self.resubmission()) if self.can_requeue else None

    def _requeue_or_stop(self, env: Any, result: Any) -> None:
        if env.global_rank != 0:
            return  # rank 0 decides; a quiet return keeps srun --kill-on-bad-exit out of it
        step = getattr(result, "step", "?")
        if not self.can_requeue:
            print(f"[phileo.launch] job {env.job_id} preempted at step {step} and NOT requeued: it already "
                  f"requeued {self.requeue_count} times (max_requeues={self.max_requeues}). To go on, "
                  f"{self.how_to_continue}.", file=sys.stderr, flush=True)
            return
        save_resubmission(env.paths.submitted_pickle, self.resubmission())
        # Before the request: locally it ends this process at once.
        self._record("requeued", f"at step {step}", requeues=self.requeue_count + 1)
        print(f"[phileo.launch] job {env.job_id} preempted at step {step}: checkpoint written, requeueing "
              f"({self.requeue_count + 1}/{self.max_requeues}); the requeued job resumes from it.",
              file=sys.stderr, flush=True)
        try:
            request_requeue(env.cluster, env.job_id)
        except RequeueRefused as e:
            # scancel'ed jobs cannot be requeued: the checkpoint is written, so report and end normally.
            self._record("preempted", f"requeue refused: {e}", requeues=self.requeue_count, reason=str(e))
            print(f"[phileo.launch] job {env.job_id}: requeue refused ({e}); the checkpoint at step {step} is "
                  f"kept: to go on, {self.how_to_continue}.", file=sys.stderr, flush=True)
            return
        # No result pickle for this run: the job is not over. SystemExit passes submitit's `except Exception`.
        raise SystemExit(exit_codes.PREEMPTED)

    def _on_failure(self, env: Any, error: BaseException) -> None:
        """An exception ends this rank (phileo.launch.failover has the rules). One that a retry cannot help
        (`retryable = False`: a bad config, a corrupt chunk) is recorded as final in state.json by global rank 0,
        except a refusal by another live writer's run.lock, which writes nothing into that run. Anything else is
        retried from the last good checkpoint: on SLURM by the batch script's teardown after the step (so that it
        is counted once, and the same way as a rank killed by -9), elsewhere here, by global rank 0. A batch
        script without the teardown (PHILEO_FAILOVER unset: written before it existed, still in the queue) gets
        the retry from here too."""
        from phileo.launch import failover
        from phileo.run_lock import RunLocked
        from phileo.run_state import is_retryable, one_line, record_final

        run_dir = self.run_dir
        if env.global_rank != 0 or run_dir is None or not run_dir.is_dir():
            return
        if not is_retryable(error):
            if not isinstance(error, RunLocked):
                record_final(run_dir, one_line(error))
            return
        if env.cluster == "slurm" and os.environ.get(FAILOVER_VARIABLE) == "1":
            return
        decision = failover.handle_failure(run_dir, exit_codes.FAILED, self.max_failures, one_line(error),
                                           requeue=lambda: request_requeue(env.cluster, env.job_id))
        if decision.action == "final":
            print(f"[phileo.launch] job {env.job_id} failed and is not retried: {decision.reason}",
                  file=sys.stderr, flush=True)

    def __repr__(self) -> str:
        what = f", argv={self.payload.get('argv')!r}" if "argv" in self.payload else ""
        return (f"TrainingJob({self.kind.name!r}{what}, requeue_count={self.requeue_count}, "
                f"max_requeues={self.max_requeues})")


__all__ = ["JobKind", "JOB_KINDS", "job_kind", "TrainingJob", "run_command", "request_requeue", "RequeueRefused",
           "save_resubmission", "export_local_rank_env", "PREEMPTED", "FAILOVER_VARIABLE"]
