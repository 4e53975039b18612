"""Pretraining end to end on generated shards with the real models: the loss decreases (U-Net, ViT); DDP and
ZeRO 1/2/3 give the same loss curve; resume is exact under ddp and zero2; a 2-node run resumed on one process
(reading both nodes' chunks) logs the same losses under ddp and zero2; a stop signal on one rank of a
2-process job checkpoints both and the resumed job finishes on the same losses; the checkpoint contract.

Multi-process runs are real: 2 processes, gloo, torchrun-style variables, laid out as 2 nodes × 1 process so each
reads its own chunks. One launch runs every strategy in sequence (DeepSpeed's import and start-up are paid once).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phileo import exit_codes
import torch

from phileo.config import apply_overrides, save_config
from phileo.train import checkpoint as ckpt_io
from phileo.train.config import PretrainConfig
from phileo.train.metrics import read_metrics

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
STEPS = 10
STRAIGHT = ("ddp", "zero1", "zero2", "zero3")
RESUMED = ("ddp", "zero2")


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    from phileo.data.synthetic import make_pretrain_shards

    return make_pretrain_shards(tmp_path_factory.mktemp("pretrain_data"), n_cells=8, nodes=2)


def pretrain_config(run_dir: Path, shards: Path, *extra: str) -> PretrainConfig:
    """A small but real pretraining: phileo_vit_tiny (CNN stem and head around a ViT; the fastest of our models
    on a CPU) at 64 px, batch 2 per process, fp32 on CPU."""
    return apply_overrides(PretrainConfig(), [
        "model.name=phileo_vit_tiny", "model.overrides={img_size: 64}", "data.patch_size=64",
        f"data.root={shards}", "data.batch_size=2", "data.num_workers=0", f"train.steps={STEPS}",
        "train.precision=fp32", "train.device=cpu", "optim.lr=1e-3", "optim.warmup_steps=2",
        "run.log_every_steps=1", "run.image_every_steps=5", "checkpoint.every_steps=4", "checkpoint.keep_last=2",
        # A CPU has no entry in the peak-FLOPs table: a nominal 1 TFLOP/s makes the MFU line testable here.
        "run.peak_tflops_per_device=1.0", f"run.dir={run_dir}", *extra])


def _rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    # 2 nodes × 1 process: GROUP_RANK is the node rank, so each process reads its own node's chunks.
    return {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
            "GROUP_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
            "DS_ACCELERATOR": "cpu", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}


def _launch(args: list[str], world: int = 2, logs: Path | None = None) -> list[subprocess.Popen]:
    from phileo.train.dist import free_port

    port = free_port()
    procs = []
    for rank in range(world):
        out = open(logs / f"rank{rank}.log", "w") if logs else subprocess.DEVNULL
        # Own session per rank, like a task under srun: a signal to its process group reaches its DataLoader
        # workers too, as SLURM's does.
        procs.append(subprocess.Popen([sys.executable, *args], env=_rank_env(rank, world, port), stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def _wait(procs: list[subprocess.Popen], timeout_s: float, logs: Path, codes: list[int] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise AssertionError(f"ranks did not finish in {timeout_s} s:\n" + _tail(logs))
    if [p.returncode for p in procs] != (codes or [0] * len(procs)):
        raise AssertionError(f"rank exit codes {[p.returncode for p in procs]}, expected {codes}:\n" + _tail(logs))


def _tail(logs: Path) -> str:
    return "\n".join(f"--- {f.name}\n" + f.read_text()[-3000:] for f in sorted(logs.glob("rank*.log")))


def _strategy_worker() -> None:
    """One rank of the strategy launch (argv: base_dir shards): every strategy straight, then ddp and zero2 as
    two launches of STEPS/2 steps each (train.max_steps_per_launch), each in its own run folder; between the two,
    rank 0 copies the folder to resized_<strategy> (a second launch on one process resumes it there)."""
    base, shards = Path(sys.argv[1]), Path(sys.argv[2])
    from phileo.train.pretrain import run_pretraining

    for strategy in STRAIGHT:
        result = run_pretraining(pretrain_config(base / strategy, shards, f"train.strategy={strategy}"))
        assert result.status == "completed", result
    for strategy in RESUMED:
        cfg = pretrain_config(base / f"resumed_{strategy}", shards, f"train.strategy={strategy}",
                              f"train.max_steps_per_launch={STEPS // 2}")
        first = run_pretraining(cfg)
        _copy_run(base / f"resumed_{strategy}", base / f"resized_{strategy}")
        second = run_pretraining(cfg)
        assert (first.status, first.step, second.status) == ("preempted", STEPS // 2, "completed"), (first, second)


def _copy_run(run: Path, to: Path) -> None:
    import shutil

    from phileo.train import dist

    if int(os.environ["RANK"]) == 0:
        shutil.copytree(run, to)
    dist.barrier()  # (the other rank would wait in the next launch's first collective anyway)


@pytest.fixture(scope="module")
def strategy_runs(tmp_path_factory, shards) -> Path:
    base = tmp_path_factory.mktemp("strategies")
    procs = _launch(["-c", "import test_train_pretrain as t; t._strategy_worker()", str(base), str(shards)],
                    logs=base)
    _wait(procs, 600, base)
    return base


def _losses(run: Path) -> list[float]:
    metrics = read_metrics(run)
    return [metrics[s]["loss/total"] for s in range(1, STEPS + 1)]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["zero1", "zero2", "zero3"])
def test_zero_strategies_follow_the_ddp_loss_curve(strategy_runs, strategy):
    ddp, zero = _losses(strategy_runs / "ddp"), _losses(strategy_runs / strategy)
    assert zero == pytest.approx(ddp, rel=1e-5, abs=1e-6)
    assert len(set(ddp)) > 1  # a curve, not a constant
    final_ddp = ckpt_io.load_model_state(strategy_runs / "ddp/checkpoints/step_00000010")
    final_zero = ckpt_io.load_model_state(strategy_runs / f"{strategy}/checkpoints/step_00000010")
    assert final_zero.keys() == final_ddp.keys()
    # Whole-model relative difference: a few parameters (the key bias of attention, which softmax ignores)
    # have a zero gradient, and Adam turns float noise there into full-size steps of either sign.
    diff = sum(((final_zero[k] - final_ddp[k]).double() ** 2).sum() for k in final_ddp) ** 0.5
    norm = sum((final_ddp[k].double() ** 2).sum() for k in final_ddp) ** 0.5
    assert diff / norm < 1e-4
    ds_cfg = json.loads((strategy_runs / strategy / "deepspeed_config.json").read_text())
    assert ds_cfg["zero_optimization"]["stage"] == int(strategy[-1]) and ds_cfg["train_batch_size"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("strategy", RESUMED)
def test_resume_reproduces_the_uninterrupted_run_exactly(strategy_runs, strategy):
    straight, resumed = strategy_runs / strategy, strategy_runs / f"resumed_{strategy}"
    assert _losses(resumed) == _losses(straight)  # exact, CPU fp32
    a = ckpt_io.load_model_state(straight / "checkpoints/step_00000010")
    b = ckpt_io.load_model_state(resumed / "checkpoints/step_00000010")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "resuming from" in (resumed / "log.txt").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", RESUMED)
def test_two_nodes_resumed_on_one_process_read_both_nodes_chunks_and_log_the_same_losses(strategy_runs, shards,
                                                                                        strategy):
    """Issue 14: the run's 2 streams (one per node's chunks) on one process with 2 micro-batches per step: the
    same samples, crops and views, so the same losses as the uninterrupted 2-node run."""
    from phileo.train.pretrain import run_pretraining

    run = strategy_runs / f"resized_{strategy}"
    result = run_pretraining(pretrain_config(run, shards, f"train.strategy={strategy}"))  # here: 1 process
    assert (result.status, result.step) == ("completed", STEPS)
    later = range(STEPS // 2 + 1, STEPS + 1)
    straight, resized = read_metrics(strategy_runs / strategy), read_metrics(run)
    assert [resized[s]["loss/total"] for s in later] == pytest.approx([straight[s]["loss/total"] for s in later],
                                                                      rel=1e-5)
    a = ckpt_io.load_model_state(strategy_runs / f"{strategy}/checkpoints/step_00000010")
    b = ckpt_io.load_model_state(run / "checkpoints/step_00000010")
    diff = sum(((b[k] - a[k]).double() ** 2).sum() for k in a) ** 0.5
    norm = sum((a[k].double() ** 2).sum() for k in a) ** 0.5
    assert diff / norm < 1e-5
    log_text = (run / "log.txt").read_text()
    assert "train.grad_accum_steps 1 → 2 keeps the global batch of 4 (2 per micro-batch)" in log_text


@pytest.mark.slow
def test_checkpoint_contract_and_run_folder(strategy_runs):
    from phileo.models import create_model

    for strategy in STRAIGHT:
        run = strategy_runs / strategy
        assert [s for s, _ in ckpt_io.list_checkpoints(run)] == [8, 10]
        assert json.loads((run / "DONE").read_text())["step"] == STEPS
        ckpt = torch.load(run / "checkpoints/step_00000010/model.pt", weights_only=False)
        assert ckpt["step"] == STEPS and ckpt["config"]["train"]["strategy"] == strategy
        model = create_model("phileo_vit_tiny", img_size=64)
        assert not any(k.startswith("module.") for k in ckpt["model"])
        model.load_state_dict(ckpt["model"], strict=True)
        assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())
        # Both ranks left their RNG state and data position.
        assert {p.name for p in (run / "checkpoints/step_00000010").glob("rank_*.pt")} == {"rank_00000.pt",
                                                                                          "rank_00001.pt"}
        env = json.loads((run / "env.json").read_text())
        assert env["layout"]["world_size"] == 2 and env["layout"]["num_nodes"] == 2 and len(env["ranks"]) == 2


@pytest.mark.slow
def test_pretraining_tensorboard_has_every_loss_term_and_images(strategy_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(strategy_runs / "zero2" / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for term in ("total", "reconstruction", "coords", "clouds", "embedding_positive", "embedding_negative",
                 "embedding_distance"):
        assert f"loss/{term}" in tags
    assert {"lr", "grad_norm", "perf/samples_per_s", "perf/samples_per_s_per_gpu", "perf/data_wait_frac"} <= tags
    # MFU = training FLOPs per sample (2 views × 3 × forward) × samples/s per process / peak.
    from phileo.models import create_model

    flops = create_model("phileo_vit_tiny", img_size=64).flops_per_sample()
    metrics = read_metrics(strategy_runs / "zero2")
    for step in (2, STEPS):
        expected = 2 * 3 * flops * metrics[step]["perf/samples_per_s_per_gpu"] / 1e12
        assert metrics[step]["perf/mfu"] == pytest.approx(expected, rel=1e-6)
    images = acc.Tags()["images"]
    assert len(images) == 1 and [e.step for e in acc.Images(images[0])] == [5, 10]
    img = acc.Images(images[0])[0]
    # Rows: target, view 1, reconstruction 1, view 2, reconstruction 2; one 64-px column per sample (batch 2).
    assert (img.height, img.width) == (5 * 64 + 4 * 2, 2 * 64 + 2)


def _held_out_loss(model, shards: Path, n: int = 48) -> tuple[float, dict[str, float]]:
    """The foundation loss of `model` on `n` fixed grid patches with fixed views: independent of training's batch
    noise, and representative (clouds are rare in the data, so a handful of patches would not be)."""
    import numpy as np

    from phileo.data import PretrainDataset
    from phileo.train.loss import FoundationLoss, make_views

    ds = PretrainDataset(shards, patch_size=64, random_crop=False)
    items = [ds[int(i)] for i in np.random.default_rng(0).choice(len(ds), n, replace=False)]
    total, terms = 0.0, {}
    for start in range(0, n, 16):
        chunk = items[start:start + 16]
        batch = {k: torch.stack([torch.as_tensor(it[k]) for it in chunk]) for k in ("image", "coords",
                                                                                    "cloud_fraction")}
        views, targets = make_views(batch["image"], torch.Generator().manual_seed(start))
        with torch.no_grad():
            loss, parts = FoundationLoss()(model(views), {"images": targets, "coords": batch["coords"],
                                                          "cloud_fraction": batch["cloud_fraction"]})
        total += float(loss) * len(chunk) / n
        for k, v in parts.items():
            terms[k] = terms.get(k, 0.0) + float(v) * len(chunk) / n
    return total, terms


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["phileo_cnn_tiny", "phileo_vit_tiny"])
def test_pretraining_loss_decreases(tmp_path, shards, model_name):
    from phileo.models import create_model
    from phileo.train.pretrain import run_pretraining

    cfg = pretrain_config(tmp_path / "run", shards, f"model.name={model_name}", "train.steps=25",
                          "data.batch_size=4", "optim.lr=1e-3", "optim.warmup_steps=3", "run.image_every_steps=0",
                          "checkpoint.every_steps=100")
    result = run_pretraining(cfg)
    assert result.status == "completed" and result.step == 25
    torch.manual_seed(cfg.train.seed)  # the engine seeds like this before building: the initial weights
    model = create_model(model_name, img_size=64).eval()
    before, before_terms = _held_out_loss(model, shards)
    model.load_state_dict(ckpt_io.load_model_state(ckpt_io.latest_checkpoint(cfg.run.dir)))
    after, after_terms = _held_out_loss(model, shards)
    assert after < 0.75 * before, (before_terms, after_terms)
    for term in ("reconstruction", "coords", "clouds"):
        assert after_terms[term] < before_terms[term], term
    metrics = read_metrics(cfg.run.dir)
    first = sum(metrics[s]["loss/reconstruction"] for s in range(1, 6)) / 5
    last = sum(metrics[s]["loss/reconstruction"] for s in range(21, 26)) / 5
    assert last < first


@pytest.mark.slow
def test_stop_signal_on_one_rank_checkpoints_all_and_the_job_resumes_exactly(tmp_path, shards, strategy_runs):
    """The CLI under a 2-process launch: SIGUSR2 to rank 1 only (its whole process group, DataLoader worker
    included, as SLURM signals) → both ranks agree, save, and exit without DONE (rank 0 with PREEMPTED, 75, the
    other with 0: phileo.exit_codes.on_this_rank); the relaunch finishes with the
    losses of the uninterrupted ddp run (which read its data without workers: same data, same order); a third
    launch finds it DONE and changes nothing."""
    run = tmp_path / "signalled"
    cfg_file = tmp_path / "pretrain.yaml"
    save_config(pretrain_config(run, shards, "train.strategy=ddp", "data.num_workers=1"), cfg_file)
    args = ["-m", "phileo.train.pretrain", "--config", str(cfg_file)]
    logs = tmp_path / "first"
    logs.mkdir()
    procs = _launch(args, logs=logs)
    deadline = time.monotonic() + 300
    while not read_metrics(run) and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    assert read_metrics(run), "no step was logged:\n" + _tail(logs)
    os.killpg(os.getpgid(procs[1].pid), signal.SIGUSR2)
    _wait(procs, 300, logs, codes=[exit_codes.PREEMPTED, exit_codes.OK])
    stopped = ckpt_io.latest_checkpoint(run)
    assert stopped is not None and ckpt_io.checkpoint_step(stopped) < STEPS, _tail(logs)
    assert not (run / "DONE").exists()
    assert {p.name for p in stopped.glob("rank_*.pt")} == {"rank_00000.pt", "rank_00001.pt"}
    assert "stop signal" in (run / "log.txt").read_text()

    logs = tmp_path / "second"
    logs.mkdir()
    _wait(_launch(args, logs=logs), 300, logs)
    assert json.loads((run / "DONE").read_text())["step"] == STEPS
    assert _losses(run) == _losses(strategy_runs / "ddp")

    before = {p: p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*")}
    out = subprocess.run([sys.executable, "-m", "phileo.train.pretrain", "--resume", str(run)], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert out.returncode == 0 and "already complete" in out.stderr
    assert {p: p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*")} == before
