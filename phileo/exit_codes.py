"""The exit statuses of every PhilEO command and job, defined here once (README: "Jobs, requeue and exit codes").

    0    OK         completed; already finished (nothing to do); for a launcher without --wait: submitted
    1    FAILED     the job failed, or a launcher's --wait saw it end without completing
    2    REFUSED    a bad command line, config, sweep file or preflight: nothing ran, nothing was submitted
    75   PREEMPTED  stopped before the time limit with a checkpoint (EX_TEMPFAIL, "try again later"): running the
                    same thing again (a requeue, the same command, `--resume`) continues from that checkpoint.
                    In a multi-process job global rank 0 exits with it, the other ranks with 0 (`on_this_rank`)
    144  LOCAL_REQUEUE  only between a task and submitit's local controller, which restarts the tasks when one
                    exits with it (the local stand-in for `scontrol requeue`); no command returns it

The same meaning everywhere: `python -m phileo.train.pretrain`, `python -m phileo.bench.finetune`,
`python -m phileo.bench.sweep run`, the launchers (jobs/*.py and the phileo-* console scripts, whose --wait maps
the job's final status here), and the batch scripts slurm/*.sh, which requeue on PREEMPTED
(tests/test_exit_codes.py checks that their literal numbers agree with this module).
"""

from __future__ import annotations

import os
from typing import Iterable, Optional

OK = 0
FAILED = 1
REFUSED = 2
PREEMPTED = 75
LOCAL_REQUEUE = 144

# A job's result status ("completed" | "skipped" | "preempted" | "failed") -> its exit status.
_BY_STATUS = {"completed": OK, "skipped": OK, "preempted": PREEMPTED}


def for_status(status: Optional[str]) -> int:
    """The exit status for a job's result status: OK, PREEMPTED, else FAILED (unknown or missing included)."""
    return _BY_STATUS.get(status or "", FAILED)


def for_statuses(statuses: Iterable[Optional[str]]) -> int:
    """The exit status for several jobs (a sweep's tasks): FAILED if any failed, else PREEMPTED if any was
    preempted, else OK (also for none)."""
    codes = {for_status(s) for s in statuses}
    for worst in (FAILED, PREEMPTED):
        if worst in codes:
            return worst
    return OK


def on_this_rank(code: int) -> int:
    """`code` as this process should exit with it: PREEMPTED only on global rank 0 (RANK, which the engine
    exports), OK on the others. srun's step status is its tasks' highest, so rank 0 alone reports the stop; a
    non-zero exit on another rank would make `srun --kill-on-bad-exit` (or torchrun) end rank 0 while it still
    closes its log and TensorBoard."""
    if code == PREEMPTED and os.environ.get("RANK", "0") != "0":
        return OK
    return code


__all__ = ["OK", "FAILED", "REFUSED", "PREEMPTED", "LOCAL_REQUEUE", "for_status", "for_statuses", "on_this_rank"]
