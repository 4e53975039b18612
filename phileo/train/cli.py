"""The command line shared by the training entry points (`python -m phileo.train.pretrain`, `...finetune`).

Both take `[--config FILE.yaml] [--print-config] [key=value ...]`, build a validated job config, run it in this
process, print one summary line and map the outcome to an exit status: 0 done (or stopped with a checkpoint, for
pretraining), 1 failed, 2 a bad command line or config (nothing ran). One place, so the two cannot drift.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, TypeVar

from phileo.config import ConfigError, to_dict

R = TypeVar("R")
# The exit statuses of the training entry points (issue 13c brings one set for every job; until it lands these
# are the values in use: pretraining exits EXIT_OK when preempted, fine-tuning EXIT_PREEMPTED).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_CONFIG = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"; the array script requeues the task


def add_config_args(parser: argparse.ArgumentParser, sections: str) -> None:
    """--config, --print-config and the key=value overrides; `sections` names the config's sections."""
    parser.add_argument("--config", help=f"YAML job config (sections {sections})")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")


def run_config_job(build: Callable[[], Any], run: Callable[[Any], R], print_config: bool,
                   summary: Callable[[R], str], exit_status: Callable[[R], int]) -> int:
    """Builds the config (exit 2 with the message when it is invalid), prints it and stops if asked, else runs
    the job, prints `summary(result)` on stderr and returns `exit_status(result)`."""
    try:
        cfg = build()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    try:
        result = run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    print(summary(result), file=sys.stderr)
    return exit_status(result)
