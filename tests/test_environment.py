"""The two environments (conda for clusters, the Makefile venv) install one package list."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~ \[]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_and_pyproject_list_the_same_packages():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    py_names = {_name(r) for r in project["dependencies"]} | {_name(r) for r in project["optional-dependencies"]["test"]}
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    conda_names = set()
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            conda_names |= {_name(r) for r in dep["pip"] if not r.startswith("-")}
        elif _name(dep) not in ("python", "pip"):
            conda_names.add(_name(dep))
    assert py_names == conda_names, (
        f"only in pyproject: {sorted(py_names - conda_names)}; only in environment.yml: {sorted(conda_names - py_names)}")


def test_cpu_pins_cover_every_package():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"]} | {_name(r) for r in project["optional-dependencies"]["test"]}
    pinned = {_name(line) for line in (REPO / "constraints.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    assert wanted <= pinned, f"not pinned in constraints.txt: {sorted(wanted - pinned)}"
    make = (REPO / "Makefile").read_text()
    assert re.search(r"torch==\d+\.\d+\.\d+", make), "the Makefile must pin the CPU torch"
