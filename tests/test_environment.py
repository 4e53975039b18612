"""The two environments (conda for clusters, the Makefile venv) install one package list, at the same versions."""

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


def _pins(lines) -> dict[str, str]:
    out = {}
    for line in lines:
        line = str(line).strip()
        if line and not line.startswith(("#", "-")):
            name, sep, version = line.partition("==")
            assert sep, f"not pinned with ==: {line!r}"
            out[_name(name)] = version.strip()
    return out


def test_environment_yml_installs_exactly_the_tested_versions():
    tested = _pins((REPO / "constraints.txt").read_text().splitlines())
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip = next(dep["pip"] for dep in env["dependencies"] if isinstance(dep, dict))
    conda_pkgs = [d for d in env["dependencies"] if isinstance(d, str)]
    assert all(_name(d) in ("python", "pip") for d in conda_pkgs), \
        f"conda packages would not be the tested pip builds: {conda_pkgs}"
    cluster = _pins(pip)
    differ = {k: (cluster.get(k), tested.get(k)) for k in cluster.keys() | tested.keys()
              if cluster.get(k) != tested.get(k)}
    assert not differ, f"environment.yml vs constraints.txt (name: (yml, constraints)): {differ}"
    make_torch = re.search(r"TORCH_CPU \?= torch==(\S+)", (REPO / "Makefile").read_text()).group(1)
    assert cluster["torch"] == make_torch
