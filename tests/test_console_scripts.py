"""The console scripts ([project.scripts] in pyproject.toml) are the jobs/ wrappers' commands, flag for flag."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# console script -> the jobs/ wrapper users already call
COMMANDS = {
    "phileo-pretrain": "launch_pretrain.py",
    "phileo-finetune": "launch_finetune.py",
    "phileo-sweep": "launch_sweep.py",
    "phileo-preprocess": "launch_preprocess.py",
    "phileo-results": "collect_results.py",
    "phileo-status": "status.py",
}


def _help(argv: list[str]) -> str:
    env = {**os.environ, "COLUMNS": "120"}  # the same wrapping for both
    out = subprocess.run([*argv, "--help"], capture_output=True, text=True, env=env, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _body(text: str) -> str:
    """Everything after the usage block: the usage line wraps differently for a longer program name."""
    return text.split("\n\n", 1)[1]


def _flags(text: str) -> set[str]:
    return set(re.findall(r"^\s{2}(?:-\w, )?(--?[\w-]+)", _body(text), flags=re.M))


def test_the_installed_package_declares_exactly_these_scripts():
    from importlib.metadata import distribution

    scripts = {ep.name: ep.value for ep in distribution("phileo-hpc").entry_points if ep.group == "console_scripts"}
    assert set(scripts) == set(COMMANDS)
    assert scripts["phileo-sweep"] == "phileo.launch.finetune:sweep_main"


@pytest.mark.parametrize("script,wrapper", sorted(COMMANDS.items()))
def test_console_script_has_the_wrappers_flags(script, wrapper):
    exe = BIN / script
    if not exe.exists():
        pytest.fail(f"{exe} is missing: the venv predates [project.scripts]; run `make venv`")
    console = _help([str(exe)])
    jobs = _help([sys.executable, str(REPO / "jobs" / wrapper)])
    assert console.startswith(f"usage: {script} ")
    assert _flags(console) == _flags(jobs) and "--help" in _flags(console)
    assert _body(console) == _body(jobs)
