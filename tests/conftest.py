"""Test harness: markers, the dev SLURM cluster fixture, and shared helpers.

The `slurm_cluster` fixture brings the one-machine SLURM cluster (slurm/dev-cluster/up.sh) up once per test
session and down at the end (only if this session started it). On a machine that cannot run it (not root, or
neither the packages nor apt-get), tests that need it are skipped at collection with that reason, unless
PHILEO_REQUIRE_SLURM=1 (set by .ci/run), where that is a failure: CI must run them. Where it can run, an up.sh
that fails is a failure too. Every test that uses the fixture is marked `slurm` here,
so `-m "not slurm"` never starts the cluster.

The `no_slurm` group (`pytest -m no_slurm`, run first by `make test`) runs the launchers with the SLURM client
hidden from PATH (`hidden_slurm_path`), as on a laptop or a fresh machine, whether or not SLURM is installed
here; a `no_slurm` test that asks for the cluster is an error.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from _launch_fixtures import hidden_slurm_path
from phileo.launch.slurm import CLIENT_TOOLS

REPO = Path(__file__).resolve().parents[1]
DEV_CLUSTER = REPO / "slurm" / "dev-cluster"
CLUSTER_NODES = int(os.environ.get("PHILEO_TEST_NODES", "8"))

# Keep every test process to one math thread: the CI machine has two cores and tests run side by side with
# SLURM daemons and worker processes.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _require_slurm() -> bool:
    return os.environ.get("PHILEO_REQUIRE_SLURM", "") == "1"


class DevCluster:
    def __init__(self, conf: Path, nodes: int, started_here: bool):
        self.conf = conf
        self.nodes = nodes
        self.started_here = started_here

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}


def _cluster_unavailable_reason() -> str | None:
    if os.name != "posix":
        return "the dev SLURM cluster needs Linux"
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return "the dev SLURM cluster needs root (it starts slurmd/munged and edits /etc/hosts)"
    have_pkgs = all(
        subprocess.run(["sh", "-c", f"command -v {c}"], capture_output=True).returncode == 0
        for c in ("slurmctld", "slurmd", "sbatch", "munged"))
    if not have_pkgs and subprocess.run(["sh", "-c", "command -v apt-get"], capture_output=True).returncode != 0:
        return "SLURM is not installed and there is no apt-get to install it"
    return None


def _controller_alive(cluster_dir: Path) -> bool:
    """A slurmctld of an earlier up.sh still runs (a leftover slurm.conf alone does not count)."""
    try:
        pid = int((cluster_dir / "run" / "slurmctld.pid").read_text())
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return False
    return state != "Z"


@pytest.fixture(scope="session")
def slurm_cluster():
    """The dev SLURM cluster (PHILEO_TEST_NODES nodes, default 8: the 8-node job of test_fault_cluster.py), SLURM_CONF
    exported for the session."""
    reason = _cluster_unavailable_reason()
    if reason:  # not root, or no SLURM and no apt-get: without PHILEO_REQUIRE_SLURM such tests were skipped at
        pytest.fail(f"PHILEO_REQUIRE_SLURM=1 but {reason}")  # collection (pytest_collection_modifyitems)
    cluster_dir = Path(os.environ.get("PHILEO_DEV_CLUSTER_DIR", "/tmp/phileo-dev-cluster"))
    was_running = _controller_alive(cluster_dir)
    proc = subprocess.run([str(DEV_CLUSTER / "up.sh"), "--nodes", str(CLUSTER_NODES)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        # Root with packages (or apt-get) at hand: a cluster that does not come up is a broken set-up, not a
        # missing condition; up.sh's own words say what failed.
        pytest.fail(f"slurm/dev-cluster/up.sh failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    conf = Path(proc.stdout.strip().splitlines()[-1].split("=", 1)[1])
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    cluster = DevCluster(conf, CLUSTER_NODES, started_here=not was_running)
    yield cluster
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old
    if cluster.started_here and os.environ.get("PHILEO_KEEP_CLUSTER", "") != "1":
        subprocess.run([str(DEV_CLUSTER / "down.sh")], capture_output=True, timeout=300)


def pytest_configure(config):
    config.addinivalue_line("markers", "no_slurm: runs the launchers with the SLURM client hidden from PATH "
                                       "(make test runs this group first, before anything starts the cluster)")


def pytest_collection_modifyitems(config, items):
    # The one condition under which cluster tests are skipped: this machine cannot run the dev cluster (not root,
    # or neither SLURM nor apt-get). Never under PHILEO_REQUIRE_SLURM=1 (CI): there the fixture fails instead.
    unavailable = None if _require_slurm() else _cluster_unavailable_reason()
    for item in items:
        uses_cluster = "slurm_cluster" in getattr(item, "fixturenames", ())
        if uses_cluster and item.get_closest_marker("no_slurm"):
            raise pytest.UsageError(f"{item.nodeid} is marked no_slurm but uses the slurm_cluster fixture")
        if uses_cluster and not item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.slurm)
        if uses_cluster and unavailable:
            item.add_marker(pytest.mark.skipif(True, reason=unavailable))


@pytest.fixture(scope="session")
def _hidden_path(tmp_path_factory) -> str:
    return hidden_slurm_path(tmp_path_factory.mktemp("nosbatch"))


@pytest.fixture
def no_slurm_path(_hidden_path, monkeypatch) -> str:
    """This test's PATH (and its subprocesses') with the SLURM client hidden; SLURM_CONF and PHILEO_SITE unset."""
    import shutil

    monkeypatch.setenv("PATH", _hidden_path)
    monkeypatch.delenv("SLURM_CONF", raising=False)
    monkeypatch.delenv("PHILEO_SITE", raising=False)
    assert all(shutil.which(t) is None for t in CLIENT_TOOLS), "a SLURM tool is still on PATH"
    return _hidden_path


@pytest.fixture(autouse=True)
def _restore_environ():
    """In-process training (init_distributed) exports RANK, WORLD_SIZE ... for DeepSpeed; a later test's
    subprocesses and SLURM jobs would inherit them. Every test gets the environment it started with back."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def submitit_folder(tmp_path):
    """A fresh submitit folder per test: job ids restart at 1 after `slurmctld -c`."""
    d = tmp_path / "submitit"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable
