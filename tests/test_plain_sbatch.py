"""The plain sbatch scripts (slurm/pretrain.sbatch, slurm/finetune_array.sh) prepare a compute node exactly as the
jobs the launchers generate from slurm/sites/leonardo.yaml, through the one file both source
(slurm/site_setup.sh), and refuse to train on the CPU of a GPU site. The set-up is run here for real under bash,
with stand-ins for Lmod's `module` and for conda (neither exists off the cluster)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from phileo.launch.sites import load_site

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "slurm" / "site_setup.sh"


def _source_setup(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Source site_setup.sh as the scripts do, with a `module` function and a conda.sh that only log their
    calls, then print the environment."""
    conda = tmp_path / "miniforge3" / "etc" / "profile.d"
    conda.mkdir(parents=True, exist_ok=True)
    (conda / "conda.sh").write_text('conda() { echo "conda $*" >> "$CALLS"; }\n')
    script = ('module() { echo "module $*" >> "$CALLS"; }\n'
              f'source {SETUP} test-script\n'
              'env -0\n')
    base = {"PATH": os.environ["PATH"], "WORK": str(tmp_path), "CALLS": str(tmp_path / "calls.txt")}
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True,
                          env={**base, **env}, timeout=60)


def _environ(out: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in out.split("\0") if "=" in item)


@pytest.mark.parametrize("script", ["slurm/pretrain.sbatch", "slurm/finetune_array.sh"])
def test_both_plain_scripts_source_the_site_setup_before_srun(script):
    text = (REPO / script).read_text()
    source = text.index('/slurm/site_setup.sh"')
    assert source < text.index("srun "), f"{script} must prepare the node before srun"


def test_setup_is_the_leonardo_profiles_setup_and_environment(tmp_path):
    site = load_site("leonardo")
    res = _source_setup(tmp_path, {"SLURM_GPUS_ON_NODE": "4"})
    assert res.returncode == 0, res.stderr
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert calls == ["module load profile/deeplrn cineca-ai", f"conda activate {tmp_path}/envs/phileo"]
    text = SETUP.read_text()
    assert all(line in text for line in site.setup), "site_setup.sh must run leonardo.yaml's setup lines"
    env = _environ(res.stdout)
    assert {k: env.get(k) for k in site.env} == dict(site.env)


def test_a_leonardo_job_without_a_gpu_is_refused(tmp_path):
    res = _source_setup(tmp_path, {})
    assert res.returncode == 2
    assert "test-script: this job has no GPU but leonardo trains on GPUs: submit with --gres=gpu:N" in res.stderr
    assert res.stdout == ""  # nothing after the refusal ran


def test_setup_none_needs_no_module_and_no_gpu_but_keeps_the_offline_flags(tmp_path):
    res = _source_setup(tmp_path, {"PHILEO_SETUP": "none"})
    assert res.returncode == 0, res.stderr
    env = _environ(res.stdout)
    assert env["HF_HUB_OFFLINE"] == "1" and env["HDF5_USE_FILE_LOCKING"] == "FALSE"
    assert not (tmp_path / "calls.txt").exists()


def test_leonardo_setup_without_lmod_names_the_fix(tmp_path):
    res = subprocess.run(["bash", "-c", f"source {SETUP} pretrain.sbatch"], capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"]}, timeout=60)
    assert res.returncode == 2 and "PHILEO_SETUP=none" in res.stderr and "pretrain.sbatch" in res.stderr
