"""The command line shared by the training entry points (`python -m phileo.train.pretrain`, `...finetune`).

Both take `[--config FILE.yaml] [--recipe default|published] [--print-config] [key=value ...]`, build a validated
job config (the recipe is a preset layer under the file and the overrides: phileo.train.recipes), run it in this
process, print one summary line and map the outcome to an exit status (phileo.exit_codes): 0 done, 75 stopped
with a checkpoint (run again to continue; on global rank 0 only), 1 failed, 2 a bad command line or config
(nothing ran).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Optional, TypeVar

from phileo import exit_codes
from phileo.config import ConfigError, to_dict

R = TypeVar("R")
EXIT_BAD_CONFIG = exit_codes.REFUSED


def add_config_args(parser: argparse.ArgumentParser, sections: str) -> None:
    """--config, --print-config and the key=value overrides; `sections` names the config's sections."""
    from phileo.train.recipes import RECIPES

    parser.add_argument("--config", help=f"YAML job config (sections {sections})")
    parser.add_argument("--recipe", choices=RECIPES, default=None,
                        help="preset under --config and the overrides: 'published' reproduces the published "
                             "code's hyperparameters (README: Fidelity to the published code); default: the "
                             "config's `recipe` key, else 'default' (the project's recipe)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")


def run_config_job(build: Callable[[], Any], run: Callable[[Any], R], print_config: bool,
                   summary: Callable[[R], str], exit_status: Optional[Callable[[R], int]] = None) -> int:
    """Builds the config (exit 2 with the message when it is invalid), prints it and stops if asked, else runs
    the job, prints `summary(result)` on stderr and returns `exit_status(result)` (default: the result's
    `status` through phileo.exit_codes.for_status)."""
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
    code = exit_status(result) if exit_status else exit_codes.for_status(getattr(result, "status", None))
    return exit_codes.on_this_rank(code)
