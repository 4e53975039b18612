"""A tiny real sweep (two fine-tunes of the demo's kind): TensorBoard's own server, started on its logs, lists
the runs by their sweep labels and serves their scalars and hparams over HTTP on 127.0.0.1; a finished task
keeps best_model.pt and result.json and no resume checkpoint (unless asked to); status reports its bytes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from phileo.bench.synthetic import make_bench_data
from phileo.bench.sweep import expand_sweep, run_sweep_task, task_dir
from phileo.launch.status import status

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    base = tmp_path_factory.mktemp("tb-sweep")
    data = base / "data"
    make_bench_data(data, regions=("europe",), patches_per_file=4, val_patches_per_file=2, patch_size=32)
    sweep = base / "demo.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "demo",
        "base": {"data.root": str(data), "data.batch_size": 2, "data.num_workers": 0,
                 "model.overrides": {"img_size": 32}, "finetune.max_epochs": 2, "finetune.warmup_epochs": 1,
                 "run.log_every_steps": 1},
        "models": [{"label": "tiny_scratch", "model.name": "phileo_cnn_tiny", "model.init": "scratch"}],
        "tasks": ["building"], "n_shots": [4], "lrs": [1.0e-3], "seeds": [0, 1]}))
    out = base / "sweep"
    for spec in expand_sweep(sweep):
        assert run_sweep_task(sweep, spec.index, out).status == "completed"
    return sweep, out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, data: bytes | None = None):
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_tensorboard_serves_the_sweep_runs_by_label(tiny_sweep):
    sweep, out = tiny_sweep
    labels = [s.name for s in expand_sweep(sweep)]
    assert labels == ["tiny_scratch_building_n4_lr0.001_s0", "tiny_scratch_building_n4_lr0.001_s1"]
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(out / "tensorboard"),
                               "--host", "127.0.0.1", "--port", str(port), "--load_fast=false"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        runs: list[str] = []
        while sorted(runs) != labels:
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, f"TensorBoard lists {runs}, not {labels}"
            try:
                runs = _get(f"{root}/data/runs")
            except OSError:
                pass
            time.sleep(1)
        tags = _get(f"{root}/data/plugin/scalars/tags")
        for label in labels:
            assert {"loss/total", "loss_window/total", "val/loss", "test/rmse", "lr"} <= set(tags[label])
        query = urllib.parse.urlencode({"run": labels[0], "tag": "loss/total"})
        points = _get(f"{root}/data/plugin/scalars/scalars?{query}")
        steps = [p[1] for p in points]
        spe = json.loads((task_dir(out, 0) / "result.json").read_text())["steps_per_epoch"]
        assert steps == list(range(1, 2 * spe + 1)) and all(p[2] > 0 for p in points)
        experiment = _get(f"{root}/data/plugin/hparams/experiment", json.dumps({"experimentName": ""}).encode())
        names = {h["name"] for h in experiment["hparamInfos"]}
        assert {"sweep_label", "sweep_index", "lr", "seed", "n_shot", "task"} <= names
        assert {m["name"]["tag"] for m in experiment["metricInfos"]} >= {"val/loss", "test/rmse"}
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_finished_task_keeps_its_results_not_its_resume_checkpoint(tiny_sweep):
    sweep, out = tiny_sweep
    d = task_dir(out, 0)
    assert (d / "best_model.pt").is_file() and (d / "result.json").is_file()
    assert not any((d / "checkpoints").glob("step_*"))
    s = status(out, ask_slurm=False)
    assert s["counts"] == {"completed": 2}
    row = s["tasks"][0]
    assert row["bytes"] == sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
    assert row["bytes"] < 3 * (d / "best_model.pt").stat().st_size + 2_000_000


def test_keep_after_completion_keeps_the_checkpoint(tiny_sweep, tmp_path):
    from phileo.bench.config import FinetuneConfig
    from phileo.bench.finetune import run_finetuning
    from phileo.config import apply_overrides

    sweep, out = tiny_sweep
    data = json.loads((task_dir(out, 0) / "result.json").read_text())["config"]["data"]["root"]
    cfg = apply_overrides(FinetuneConfig(), {
        "data.root": data, "data.task": "building", "data.n_shot": 4, "data.batch_size": 2, "data.num_workers": 0,
        "model.name": "phileo_cnn_tiny", "model.init": "scratch", "model.overrides": {"img_size": 32},
        "finetune.max_epochs": 1, "finetune.warmup_epochs": 0, "run.tensorboard": False,
        "checkpoint.keep_after_completion": True, "run.dir": str(tmp_path / "run")})
    assert run_finetuning(cfg).status == "completed"
    assert any((tmp_path / "run" / "checkpoints").glob("step_*"))
