"""The generic Trainer on a small stand-in task: run folder, TensorBoard, DONE, NaN, signals, early stopping,
exact resume in one process, and one failing rank ending a real 2-process gloo job."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from phileo.config import apply_overrides
from phileo.train import checkpoint as ckpt_io
from phileo.train.config import PretrainConfig
from phileo.train.engine import Task, Trainer
from phileo.train.metrics import read_metrics
from phileo.train.optim import lr_factor

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


class ToyDataset(Dataset):
    """Small 3×8×8 images whose target is a fixed linear function of their channel means; set_epoch-aware."""

    def __init__(self, n: int = 24, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 10_000 + self.epoch * 100 + i)
        image = torch.rand(3, 8, 8, generator=g)
        target = image.mean(dim=(1, 2)) * torch.tensor([1.0, -2.0, 0.5])
        return {"image": image, "target": target}


class ToyTask(Task):
    """A tiny conv regressor. Knobs for the tests: poison_step (outputs become NaN), signal_at (this rank sends
    itself SIGUSR2 while computing that step), fail_at (this rank raises), stop_after_evals (early stop)."""

    def __init__(self, poison_step=None, signal_at=None, fail_at=None, stop_after_evals=None, build_raises=False):
        self.poison_step, self.signal_at, self.fail_at = poison_step, signal_at, fail_at
        self.stop_after_evals, self.build_raises = stop_after_evals, build_raises
        self.evals = 0

    def build_model(self) -> nn.Module:
        if self.build_raises:
            raise AssertionError("build_model must not be called for a finished run")
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(8, 3))

    def train_dataset(self, info):
        return ToyDataset()

    def forward(self, model, batch, ctx):
        if self.signal_at is not None and (ctx.step, ctx.global_rank) == tuple(self.signal_at):
            os.kill(os.getpid(), signal.SIGUSR2)
        if self.fail_at is not None and (ctx.step, ctx.global_rank) == tuple(self.fail_at):
            raise RuntimeError(f"injected failure on rank {ctx.global_rank} at step {ctx.step}")
        out = model(batch["image"])
        if self.poison_step is not None and ctx.step == self.poison_step:
            out = out * float("nan")
        return out

    def compute_loss(self, outputs, batch):
        mse = ((outputs - batch["target"]) ** 2).mean()
        return mse, {"mse": mse, "l1": (outputs - batch["target"]).abs().mean()}

    def images(self, outputs, batch):
        return {"images/input": batch["image"][0].clamp(0, 1)}

    def evaluate(self, trainer, step):
        self.evals += 1
        return {"val/loss": 1.0 / self.evals}

    def should_stop(self):
        return self.stop_after_evals is not None and self.evals >= self.stop_after_evals

    def state_dict(self):
        return {"evals": self.evals}

    def load_state_dict(self, state):
        self.evals = state.get("evals", 0)


def toy_config(run_dir: Path, *extra: str):
    return apply_overrides(PretrainConfig(), [
        f"run.dir={run_dir}", "train.steps=6", "data.batch_size=4", "data.num_workers=0", "optim.lr=5e-2",
        "optim.warmup_steps=2", "run.log_every_steps=1", "run.image_every_steps=3", "checkpoint.every_steps=2",
        "checkpoint.keep_last=2", *extra])


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("toy") / "straight"
    result = Trainer(toy_config(run), ToyTask()).fit()
    return run, result


def test_run_folder_layout_and_done_marker(straight_run):
    run, result = straight_run
    assert result.status == "completed" and result.step == 6
    for name in ("config.yaml", "env.json", "log.txt", "metrics.jsonl", "DONE"):
        assert (run / name).is_file(), name
    assert not (run / "deepspeed_config.json").exists()  # ddp
    done = json.loads((run / "DONE").read_text())
    assert done["step"] == 6 and done["final_loss"] == pytest.approx(result.final_loss)
    assert [s for s, _ in ckpt_io.list_checkpoints(run)] == [4, 6]  # every 2 steps, keep_last=2
    model_pt = torch.load(run / "checkpoints/step_00000006/model.pt", weights_only=False)
    assert model_pt["step"] == 6 and model_pt["config"]["train"]["steps"] == 6
    assert set(model_pt["model"]) == {"0.weight", "0.bias", "4.weight", "4.bias"}
    assert all(v.dtype == torch.float32 for v in model_pt["model"].values())
    env = json.loads((run / "env.json").read_text())
    assert env["versions"]["torch"] == torch.__version__ and env["layout"]["world_size"] == 1
    assert "step 6/6" in (run / "log.txt").read_text()
    for p in [run / "log.txt", run / "DONE", *(run / "tensorboard").iterdir()]:
        assert p.stat().st_mode & 0o040, f"{p} is not group-readable"


def test_tensorboard_events_read_back(straight_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = straight_run
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("loss/total", "loss/mse", "loss/l1", "lr", "grad_norm", "perf/samples_per_s",
                "perf/samples_per_s_per_gpu", "perf/step_time_s", "perf/data_wait_s", "perf/data_wait_frac",
                "mem/host_rss_peak_gib"):
        assert tag in scalars, f"{tag} missing from {sorted(scalars)}"
    assert "perf/mfu" not in scalars  # no peak FLOPs known for a CPU
    metrics = read_metrics(run)
    losses = acc.Scalars("loss/total")
    assert [e.step for e in losses] == [1, 2, 3, 4, 5, 6]
    for e in losses:
        assert e.value == pytest.approx(metrics[e.step]["loss/total"], rel=1e-6)
    # The LR each step used follows warm-up + cosine of the config (5e-2, 2 warm-up steps, 6 steps).
    for e in acc.Scalars("lr"):
        assert e.value == pytest.approx(5e-2 * lr_factor(e.step - 1, 6, 2, 0.0), rel=1e-6, abs=1e-12)
    assert [e.step for e in acc.Images("images/input")] == [3, 6]
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["strategy"].string_value == "ddp" and hparams["steps"].number_value == 6


def test_a_finished_run_returns_at_once(straight_run):
    run, result = straight_run
    before = {p: p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*")}
    again = Trainer(toy_config(run), ToyTask(build_raises=True)).fit()
    assert again.status == "completed" and again.step == 6 and again.final_loss == result.final_loss
    assert {p: p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*")} == before


def test_signal_stops_with_a_checkpoint_and_resume_is_exact(straight_run, tmp_path):
    run, _ = straight_run
    resumed = tmp_path / "signalled"
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda s, f: seen.append(s))
    try:
        first = Trainer(toy_config(resumed), ToyTask(signal_at=(3, 0))).fit()
        assert first.status == "preempted" and first.step == 3 and "SIGUSR2" in first.message
        assert ckpt_io.latest_checkpoint(resumed).name == "step_00000003"
        assert not (resumed / "DONE").exists()
        assert signal.getsignal(signal.SIGUSR2) is not None and seen == []
        os.kill(os.getpid(), signal.SIGUSR2)  # the engine gave the previous handler back
        assert seen == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)
    second = Trainer(toy_config(resumed), ToyTask()).fit()
    assert second.status == "completed" and second.step == 6
    a, b = read_metrics(run), read_metrics(resumed)
    assert [b[s]["loss/total"] for s in range(1, 7)] == [a[s]["loss/total"] for s in range(1, 7)]
    assert second.final_loss == straight_run[1].final_loss


def test_nan_loss_stops_naming_step_and_terms_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "nan"
    result = Trainer(toy_config(run), ToyTask(poison_step=5)).fit()
    assert result.status == "failed" and result.step == 5
    assert "step 5" in result.message and "mse" in result.message and "l1" in result.message
    assert "step_00000004" in result.message
    assert [s for s, _ in ckpt_io.list_checkpoints(run)] == [2, 4]
    assert not (run / "DONE").exists()
    weights = ckpt_io.load_model_state(ckpt_io.latest_checkpoint(run))
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert "non-finite loss at step 5" in (run / "log.txt").read_text()


def test_early_stop_from_the_task_completes_the_run(tmp_path):
    run = tmp_path / "early"
    task = ToyTask(stop_after_evals=2)
    result = Trainer(toy_config(run, "train.eval_every_steps=2"), task).fit()
    assert result.status == "completed" and result.step == 4 and result.message == "stopped early"
    assert json.loads((run / "DONE").read_text())["stopped_early"] is True
    metrics = read_metrics(run)
    assert metrics[2]["val/loss"] == 1.0 and metrics[4]["val/loss"] == 0.5
    assert torch.load(run / "checkpoints/step_00000004/trainer.pt", weights_only=False)["task"] == {"evals": 2}


def test_max_steps_per_launch_chains_launches(tmp_path):
    run = tmp_path / "chained"
    cfg = toy_config(run, "train.max_steps_per_launch=4")
    first = Trainer(cfg, ToyTask()).fit()
    second = Trainer(cfg, ToyTask()).fit()
    assert (first.status, first.step, second.status, second.step) == ("preempted", 4, "completed", 6)


# ------------------------------------------------------------------------------------------ two processes
def _worker_main() -> None:
    """Entry of one rank of the 2-process test (run as a subprocess; argv: run_dir)."""
    info_rank = int(os.environ["RANK"])
    cfg = toy_config(Path(sys.argv[1]), "train.steps=20", "train.dist_timeout_s=60")
    Trainer(cfg, ToyTask(fail_at=(3, 1))).fit()
    print(f"rank {info_rank} finished without error", flush=True)


def _spawn_ranks(args: list[str], n: int, port: int, extra_env: dict | None = None) -> list[subprocess.Popen]:
    procs = []
    for rank in range(n):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(n), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
               **(extra_env or {})}
        procs.append(subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


@pytest.mark.slow
def test_an_exception_on_one_rank_ends_every_rank(tmp_path):
    from phileo.train.dist import free_port

    procs = _spawn_ranks(["-c", "import test_engine; test_engine._worker_main()", str(tmp_path / "run")], 2,
                         free_port())
    t0 = time.monotonic()
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=90)  # far below dist_timeout_s would be a hang: fail loudly
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    elapsed = time.monotonic() - t0
    assert all(p.returncode != 0 for p in procs), outputs
    assert "injected failure on rank 1 at step 3" in outputs[1]
    assert "finished without error" not in "".join(outputs)
    assert elapsed < 60, f"the healthy rank took {elapsed:.0f} s to notice its peer died"
    assert not math.isnan(elapsed)


def test_raising_train_steps_extends_a_finished_run(straight_run, tmp_path):
    import shutil

    run = tmp_path / "extended"
    shutil.copytree(straight_run[0], run)
    result = Trainer(toy_config(run, "train.steps=8"), ToyTask()).fit()
    assert result.status == "completed" and result.step == 8
    assert json.loads((run / "DONE").read_text())["step"] == 8
    assert sorted(read_metrics(run)) == list(range(1, 9))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_gradient_accumulation_matches_the_larger_batch(tmp_path, strategy):
    """4 samples per step as one batch or as 2 micro-batches of 2: same mean gradient, same loss curve."""
    whole = Trainer(toy_config(tmp_path / "whole", f"train.strategy={strategy}"), ToyTask()).fit()
    accum = Trainer(toy_config(tmp_path / "accum", f"train.strategy={strategy}", "data.batch_size=2",
                               "train.grad_accum_steps=2"), ToyTask()).fit()
    assert (whole.status, accum.status) == ("completed", "completed")
    a, b = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "accum")
    assert [b[s]["loss/total"] for s in range(1, 7)] == pytest.approx([a[s]["loss/total"] for s in range(1, 7)],
                                                                      rel=1e-5)
    assert b[6]["perf/samples_per_s"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "zero1", "zero2"])
def test_bf16_on_cpu_trains_and_saves_fp32_weights(tmp_path, strategy):
    run = tmp_path / "bf16"
    trainer = Trainer(toy_config(run, f"train.strategy={strategy}", "train.precision=bf16"), ToyTask())
    result = trainer.fit()
    assert result.status == "completed" and math.isfinite(result.final_loss)
    metrics = read_metrics(run)
    assert metrics[6]["loss/total"] < metrics[1]["loss/total"]
    weights = ckpt_io.load_model_state(ckpt_io.latest_checkpoint(run))
    assert all(v.dtype == torch.float32 for v in weights.values())
    if strategy != "ddp":
        # The fp32 masters (zero1: joined from DeepSpeed's BF16_Optimizer files), each under its own name: cast
        # to bf16 they are the working weights the model trains with, yet they hold more than bf16 does.
        live = {k: v.detach() for k, v in trainer.model.named_parameters()}
        assert all(v.dtype == torch.bfloat16 for v in live.values())
        for name, w in live.items():
            assert torch.equal(weights[name].bfloat16(), w), name
        trained = torch.cat([v.flatten() for v in weights.values()])
        assert not torch.equal(trained, trained.bfloat16().float())
    if strategy == "zero2":
        assert json.loads((run / "deepspeed_config.json").read_text())["bf16"] == {"enabled": True}
