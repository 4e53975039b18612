"""Failures that are not preemptions: counted, retried from the last good checkpoint, or made final. One rule,
`handle_failure`, with two callers:

- The batch script of every SLURM job the launchers write (and slurm/pretrain.sbatch, slurm/finetune_array.sh)
  runs `python -m phileo.launch.failover` after its srun step. That covers what no rank can do for itself: a rank
  killed by -9 or by the kernel's OOM killer (srun --kill-on-bad-exit then ends the others), the hang watchdog's
  exit (phileo.train.watchdog), and an exception on any rank. The ranks themselves never requeue after a failure
  on SLURM, so each failure is counted exactly once.
- submitit's local executor has no batch script: there TrainingJob calls handle_failure in-process when the work
  raises (a killed or hung local process is not retried).

What is not a failure: exit status 0 (completed, or a "failed" result such as a non-finite loss, which a retry
from the same checkpoint would only repeat) and 75 (PREEMPTED: global rank 0 asked for the requeue itself).
What is not retried: a run folder held by another live writer (the job was refused by run.lock; nothing is written
into that folder), a failure the job recorded as final in state.json itself (an exception whose class says
`retryable = False`: a bad config, a corrupt chunk under data.on_bad_chunk=stop; a retry cannot help), and exit
status 2 (REFUSED: the entry point refused its command line or config; nothing ran).

Anything else is counted in the run's state.json: `failures` is the number of failures in a row since the last
checkpoint (every checkpoint, and every new submission, sets it back to 0: a weeks-long campaign is not ended by
three unrelated node faults, while a crash loop stops at once). The job is requeued (state "requeued", the cause
in `reason`) while failures <= max_failures, so a run is retried up to max_failures times; then state.json says
"failed" with the reason and what to do, and the job stays ended. The cause is read from what this start left:
the hang watchdog's stacks (RUN/stacks/ files written since the job started), else the job's rank logs written
since it started, from their last start line on (phileo.launch.submit.rank_log_cause), else the exit status.
A start whose rank 0 asked for its own requeue (a preemption; state.json's last event "requeued") is left alone,
whatever srun's status says. A state.json that cannot be written (a full disk) does not stop the decision.

    python -m phileo.launch.failover --exit-code RC --submitit-folder RUN/logs          (generated jobs)
    python -m phileo.launch.failover --exit-code RC --run-dir RUN [--max-failures 3]  (plain sbatch scripts)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from phileo import exit_codes, run_lock
from phileo.run_state import (failed_since_start, read_state, record_final, slurm_job_id,
                              update_state)

STACKS_DIR = "stacks"  # phileo.train.watchdog.STACKS_DIR (not imported: this module runs without torch)


@dataclass
class Decision:
    """What handle_failure decided: `action` "none" (not a failure), "refused" (another writer holds the run:
    nothing recorded), "final" (not retried: recorded by the job, or no failure left), "retry" (requeued);
    `failures` in a row without progress, and the one-line `reason`."""

    action: str
    failures: int
    reason: str


def _write(run_dir: Path, *args: Any, **fields: Any) -> None:
    """update_state that never stops the decision: a full disk is said in the job's log, and the job is still
    requeued (or left ended) as decided."""
    try:
        update_state(run_dir, *args, **fields)
    except (OSError, ValueError) as e:
        print(f"[phileo.failover] could not update {run_dir / 'state.json'}: {e}", file=sys.stderr, flush=True)


def handle_failure(run_dir: Optional[Path], exit_code: int, max_failures: int, reason: Optional[str],
                   requeue: Callable[[], None], job_id: Optional[str] = None,
                   since: Optional[float] = None) -> Decision:
    """Decides about one failed launch of the run in `run_dir` (see the module docstring) and acts: records it
    in state.json and calls `requeue()` (which may end this process: the local executor's requeue does) when a
    failure is left. `reason`: the cause found, or None (then the exit status is named). `job_id`: this job
    (its own run.lock is not another writer's). `since`: when this start of the job began (POSIX time; None:
    unknown), to tell its own events from an earlier start's. A run without a folder (run_dir None) is never
    retried. Returns the Decision."""
    if exit_code in (exit_codes.OK, exit_codes.PREEMPTED):
        return Decision("none", 0, "")
    why = reason or f"the job step ended with exit status {exit_code}"
    if run_dir is None or not Path(run_dir).is_dir():
        return Decision("final", 0, why)
    run_dir = Path(run_dir)
    owner = run_lock.read_lock(run_dir)
    # "unknown" (squeue did not answer) is retried: the requeued job checks the lock again at its start.
    if owner and run_lock.holder_status(owner, {**run_lock.this_owner(), "job_id": job_id}) == "live":
        return Decision("refused", 0, f"{run_dir} is in use by {run_lock.describe(owner)}")
    try:
        state = read_state(run_dir) or {}
    except ValueError:
        state = {}
    events = state.get("events") or []
    if events and events[-1].get("event") == "requeued" and _at_or_after(events[-1].get("time"), since):
        return Decision("none", 0, "")  # rank 0 of this start asked for the requeue itself (preempted)
    if state.get("state") == "failed" and state.get("final") and failed_since_start(state):
        return Decision("final", int(state.get("failures") or 0), str(state.get("reason") or why))
    if exit_code == exit_codes.REFUSED:  # a bad command line or config: nothing ran, a retry would repeat it
        why = reason or "the job refused its command line or config (exit status 2): see its log"
        try:
            record_final(run_dir, why)
        except (OSError, ValueError) as e:
            print(f"[phileo.failover] could not update {run_dir / 'state.json'}: {e}", file=sys.stderr)
        return Decision("final", int(state.get("failures") or 0), why)
    failures = int(state.get("failures") or 0) + 1
    fields = dict(failures=failures, max_failures=max_failures, final=False)
    if failures > max_failures:
        final = (f"failed {failures} time(s) in a row since the last checkpoint (retried {max_failures} times, "
                 f"--max-failures); last: {why}. Fix the cause (see {run_dir / 'logs'} and log.txt), then "
                 f"resubmit with --resume {run_dir}")
        _write(run_dir, "failed", event="failed", detail=why, reason=final[:700], **fields)
        return Decision("final", failures, final)
    _write(run_dir, "requeued", event="failure", detail=why, reason=why[:500], **fields)
    print(f"[phileo.failover] {why}; retrying from the last good checkpoint ({failures}/{max_failures} retries "
          f"in a row)", file=sys.stderr, flush=True)
    try:
        requeue()
    except RuntimeError as e:  # RequeueRefused: the scheduler said no (the job was cancelled); the run stops here
        _write(run_dir, "failed", event="failed", detail=f"requeue refused: {e}",
               reason=f"{why}; the retry was refused: {e}"[:500], **fields)
        return Decision("final", failures, f"{why}; the retry was refused: {e}")
    return Decision("retry", failures, why)


def _at_or_after(iso: Optional[str], since: Optional[float]) -> bool:
    """An event's ISO time is not before `since` (True when either is unknown)."""
    if not iso or since is None:
        return True
    try:
        return _dt.datetime.fromisoformat(iso).timestamp() >= since - 1
    except ValueError:
        return True


# ------------------------------------------------------------------------------------------ the cause
def job_record(job_id: str) -> dict[str, str]:
    """`scontrol show job`'s Key=Value fields of this SLURM job ({} when it cannot be asked)."""
    try:
        out = subprocess.run(["scontrol", "show", "job", str(job_id)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    record: dict[str, str] = {}
    for line in out.stdout.splitlines():
        key = line.strip().split("=", 1)[0]
        if key in ("StdErr", "StdOut", "StdIn", "WorkDir", "Command"):  # a path, alone on its line: spaces kept
            record[key] = line.strip().split("=", 1)[1]
        else:
            record.update(word.split("=", 1) for word in line.split() if "=" in word)
    return record


def started_at(record: dict[str, str]) -> Optional[float]:
    """When the job's current run (after any requeue) started, as a POSIX time; None when unknown."""
    try:
        return _dt.datetime.fromisoformat(record["StartTime"]).timestamp()
    except (KeyError, ValueError):
        return None


def hang_cause(run_dir: Path, since: Optional[float]) -> Optional[str]:
    """The hang watchdog's verdict if it fired during this start: its stacks files modified since `since`."""
    if since is None:
        return None
    fired = []
    for f in sorted((Path(run_dir) / STACKS_DIR).glob("rank_*.txt")):
        try:
            if f.stat().st_mtime >= since - 1 and "Timeout (" in f.read_text(errors="replace"):
                fired.append(f.name)
        except OSError:
            continue
    if not fired:
        return None
    return (f"hang watchdog: no progress for run.hang_timeout_s on {len(fired)} rank(s); stacks in "
            f"{Path(run_dir) / STACKS_DIR}/ ({', '.join(fired[:4])}{' ...' if len(fired) > 4 else ''})")


def find_cause(run_dir: Optional[Path], log_dir: Optional[Path], job_id: str,
               record: dict[str, str]) -> Optional[str]:
    """Why this start of the job failed: the hang watchdog, else the job's rank logs since their last start,
    else the batch script's own output files (scontrol's StdErr/StdOut: srun's "task 1: Killed" lands there)."""
    from phileo.launch.submit import log_cause, rank_log_cause

    since = started_at(record)
    cause = hang_cause(run_dir, since) if run_dir is not None else None
    if cause is None and log_dir is not None and Path(log_dir).is_dir():
        cause = rank_log_cause(log_dir, job_id=job_id, since=since)
    if cause is None:
        own = [Path(record[k]) for k in ("StdErr", "StdOut") if record.get(k)]
        cause = log_cause(dict.fromkeys(own), last_start_only=True, since=since)
    return cause


# ------------------------------------------------------------------------------------------ the command
def _submitit_job(folder: Path, job_id: str) -> Any:
    """The TrainingJob this submitit job runs (its submission pickle), or None when it cannot be read."""
    from submitit.core.utils import DelayedSubmission, JobPaths

    try:
        return DelayedSubmission.load(JobPaths(folder, job_id=job_id).submitted_pickle).function
    except Exception as e:  # a missing or foreign pickle: no retry, but say why
        print(f"[phileo.failover] cannot read the job's submission in {folder}: {e}", file=sys.stderr)
        return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m phileo.launch.failover",
                                description="After a SLURM job step: count a failure and requeue the job from the "
                                            "last good checkpoint, or record the run as failed (batch scripts call "
                                            "this; see the module docstring).")
    p.add_argument("--exit-code", type=int, required=True, help="the srun step's exit status")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--submitit-folder", type=Path, help="the job's submitit folder (generated jobs)")
    where.add_argument("--run-dir", type=Path, help="the run folder (plain sbatch scripts)")
    p.add_argument("--log-dir", type=Path, default=None, help="where the job's rank logs are (default: the "
                                                               "submitit folder, else RUN/logs)")
    p.add_argument("--max-failures", type=int, default=3, help="with --run-dir (default 3)")
    p.add_argument("--job-id", default=None, help="default: this job's, from the SLURM variables")
    args = p.parse_args(argv)
    if args.exit_code in (exit_codes.OK, exit_codes.PREEMPTED):
        return args.exit_code
    job_id = args.job_id or slurm_job_id()
    if not job_id:
        print("[phileo.failover] not inside a SLURM job (no SLURM_JOB_ID): nothing to requeue", file=sys.stderr)
        return args.exit_code
    run_dir, max_failures, log_dir = args.run_dir, args.max_failures, args.log_dir
    if args.submitit_folder is not None:
        job = _submitit_job(args.submitit_folder, job_id)
        if job is None or not getattr(getattr(job, "kind", None), "requeue", False):
            return args.exit_code  # not a job kind that requeues (a converter slice fails its dependants)
        run_dir, max_failures = job.run_dir, job.max_failures
        log_dir = log_dir or args.submitit_folder
    elif log_dir is None and (run_dir / "logs").is_dir():
        log_dir = run_dir / "logs"
    from phileo.launch.jobs import request_requeue

    record = job_record(job_id)
    reason = find_cause(run_dir, log_dir, job_id, record)
    decision = handle_failure(run_dir, args.exit_code, max_failures, reason,
                              requeue=lambda: request_requeue("slurm", job_id), job_id=job_id,
                              since=started_at(record))
    if decision.action == "final":
        print(f"[phileo.failover] job {job_id} failed and is not retried: {decision.reason}", file=sys.stderr)
    elif decision.action == "refused":
        print(f"[phileo.failover] job {job_id} was refused ({decision.reason}): not retried", file=sys.stderr)
    return args.exit_code


if __name__ == "__main__":
    sys.exit(main())
