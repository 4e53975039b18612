"""One exit-code set (phileo.exit_codes) for every command, job and batch script."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from phileo import exit_codes

REPO = Path(__file__).resolve().parents[1]


def test_statuses_map_to_one_set_of_codes():
    assert [exit_codes.for_status(s) for s in ("completed", "skipped", "preempted", "failed", None, "?")] == \
        [0, 0, 75, 1, 1, 1]
    assert exit_codes.for_statuses(["completed", "preempted", "skipped"]) == exit_codes.PREEMPTED
    assert exit_codes.for_statuses(["preempted", "failed"]) == exit_codes.FAILED
    assert exit_codes.for_statuses([]) == exit_codes.OK


def test_only_global_rank_0_exits_preempted(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert exit_codes.on_this_rank(exit_codes.PREEMPTED) == exit_codes.OK
    assert exit_codes.on_this_rank(exit_codes.FAILED) == exit_codes.FAILED  # a failure still ends the step
    monkeypatch.setenv("RANK", "0")
    assert exit_codes.on_this_rank(exit_codes.PREEMPTED) == exit_codes.PREEMPTED


@pytest.mark.parametrize("script", ["slurm/pretrain.sbatch", "slurm/finetune_array.sh"])
def test_batch_scripts_requeue_on_the_preempted_code(script):
    """Shell cannot import the module: its literal numbers must be the module's, and the requeue is on PREEMPTED."""
    text = (REPO / script).read_text()
    tested = {int(n) for n in re.findall(r'"\$status" -eq (\d+)', text)}
    assert tested == {exit_codes.PREEMPTED}
    branch = text.split(f'"$status" -eq {exit_codes.PREEMPTED}', 1)[1].split("\nfi\n", 1)[0]
    assert "scontrol requeue" in branch


@pytest.mark.slow
def test_pretraining_exits_75_when_stopped_with_a_checkpoint_then_0_when_done(tmp_path):
    from phileo.data.synthetic import make_pretrain_shards

    shards = make_pretrain_shards(tmp_path / "shards", n_cells=2, nodes=1)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "phileo.train.pretrain", "model.name=phileo_cnn_tiny", f"data.root={shards}",
           f"run.dir={run}", "train.steps=2", "train.max_steps_per_launch=1", "data.batch_size=2",
           "data.num_workers=0", "optim.warmup_steps=1", "run.image_every_steps=0", "run.tensorboard=false"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert first.returncode == exit_codes.PREEMPTED, first.stderr[-3000:]
    assert not (run / "DONE").exists()
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert second.returncode == exit_codes.OK, second.stderr[-3000:]
    assert (run / "DONE").exists()
    bad = subprocess.run([*cmd, "train.steps=-1"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert bad.returncode == exit_codes.REFUSED and "train.steps" in bad.stderr
