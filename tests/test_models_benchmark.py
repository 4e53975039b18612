"""benchmarks/models.py runs and reports what it claims (the figures themselves live in benchmarks/README.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from phileo.models import list_models

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "models.py"


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_models_table_lists_every_registered_model():
    proc = run("--table-only")
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| phileo_")]
    assert sorted(r.split("|")[1].strip() for r in rows) == list_models()
    assert "| phileo_cnn_44m | 43,667,714 |" in proc.stdout


@pytest.mark.slow
def test_benchmark_measures_a_tiny_model(tmp_path):
    out = tmp_path / "bench.json"
    proc = run("--models", "phileo_vit_tiny", "--downstream", "--compile", "none", "--steps", "1", "--warmup", "0",
               "--threads", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())["results"]
    assert [r["model"] for r in results] == ["phileo_vit_tiny", "phileo_vit_tiny:downstream"]
    for r in results:
        assert r["samples_per_s"] > 0 and r["fwd_gflops_per_sample"] > 0
        assert r["mem_kind"] != "unavailable" and r["peak_mem_mib"] > 1  # activations of a batch of 4 at least
