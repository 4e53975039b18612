"""The Trainer's components, each alone on CPU in one process: CheckpointManager, StopPolicy and EarlyStopping,
Evaluator, MetricsLogger and ThroughputWindow, and the one config builder."""

from __future__ import annotations

import os

import json
import logging
import math
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import yaml
from torch.utils.data import Dataset

from phileo.bench.config import FinetuneConfig
from phileo.config import ConfigError, save_config, to_dict
from phileo.train import checkpoint as ckpt_io
from phileo.train.checkpoint import CheckpointManager
from phileo.train.config import JobConfig, LoaderConfig, OptimConfig, PretrainConfig, TrainConfig, build_config
from phileo.train.dist import DistInfo
from phileo.train.evaluate import EvaluationInterrupted, Evaluator
from phileo.train.metrics import MetricsLogger, ThroughputWindow, read_metrics
from phileo.train.signals import StopFlag
from phileo.train.stop import EarlyStopping, StopPolicy, steps_per_epoch
from phileo.train.strategy import build_strategy

torch.set_num_threads(1)
ONE = DistInfo()  # a single CPU process, no process group


# -------------------------------------------------------------------------------------- CheckpointManager
def _strategy(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    return build_strategy(model, ONE, TrainConfig(), OptimConfig(lr=1e-2, warmup_steps=0), 4, False)


def _train_one_step(strategy) -> None:
    x = torch.randn(4, 4)
    loss = strategy.module(x).pow(2).mean()
    strategy.backward(loss, True)
    strategy.optimizer_step()


def _save(manager: CheckpointManager, strategy, step: int, **rank_extra) -> Path:
    return manager.save(step, strategy, payload={"step": step},
                        trainer_state={"step": step, "last_loss": 0.5, "task": {"best": step},
                                       "strategy": "ddp", "world_size": 1},
                        rank_state={"rng": ckpt_io.capture_rng_state(), "samples_consumed": 8 * step, **rank_extra})


def test_checkpoint_manager_saves_lists_and_keeps_the_newest(tmp_path):
    strategy = _strategy(0)
    manager = CheckpointManager(tmp_path, keep_last=2, info=ONE)
    for step in (2, 4, 6):
        _train_one_step(strategy)
        folder = _save(manager, strategy, step)
        assert folder == ckpt_io.checkpoint_dir(tmp_path, step) and manager.verify(folder) == []
    assert [s for s, _ in manager.list()] == [4, 6] and manager.latest().name == "step_00000006"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]
    assert sorted(p.name for p in manager.latest().iterdir()) == ["manifest.json", "model.pt", "optimizer.pt",
                                                                   "rank_00000.pt", "trainer.pt"]
    assert manager.load_task_state() == {"best": 6}


def test_checkpoint_manager_loads_weights_optimizer_and_rank_state_back(tmp_path):
    saved = _strategy(0)
    _train_one_step(saved)
    manager = CheckpointManager(tmp_path, keep_last=1, info=ONE)
    folder = _save(manager, saved, 3)
    fresh = _strategy(1)
    assert not torch.equal(fresh.model[0].weight, saved.model[0].weight)
    resumed = manager.load(folder, fresh, expect_strategy="ddp")
    assert resumed.step == 3 and resumed.trainer["task"] == {"best": 3} and resumed.rank["samples_consumed"] == 24
    for k, v in saved.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[k], v), k
    a, b = saved.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[i]["exp_avg"], b[i]["exp_avg"]) for i in a)
    # Another number of processes: the weights load, the per-rank streams do not apply.
    other = CheckpointManager(tmp_path, keep_last=1, info=DistInfo(world_size=2, local_world_size=2))
    assert other.load(folder, _strategy(2), expect_strategy="ddp").rank is None
    with pytest.raises(RuntimeError, match="written with train.strategy=ddp but this run uses train.strategy=zero2"):
        manager.load(folder, _strategy(3), expect_strategy="zero2")


def test_checkpoint_manager_verify_names_what_is_missing_and_stale_folders_go(tmp_path):
    strategy = _strategy(0)
    manager = CheckpointManager(tmp_path, keep_last=3, info=ONE)
    folder = _save(manager, strategy, 5)
    (folder / "trainer.pt").unlink()
    (folder / "model.pt").write_bytes(b"")
    problems = ckpt_io.verify_checkpoint(folder)
    assert len(problems) == 2 and problems[0].startswith("model.pt has 0 bytes, the manifest says")
    assert problems[1] == "trainer.pt is missing"
    with pytest.raises(FileNotFoundError, match="trainer state not found: .*trainer.pt.*delete it"):
        manager.load(folder, strategy, expect_strategy="ddp")
    stale = ckpt_io.tmp_checkpoint_dir(tmp_path, 7)
    stale.mkdir()
    assert manager.clean_stale() == [stale] and not stale.exists()
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        CheckpointManager(tmp_path, keep_last=0, info=ONE)


def test_checkpoint_manager_done_marker(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1, info=ONE)
    assert manager.done() is None
    manager.mark_done(12, 0.25, stopped_early=True)
    assert manager.done() == {"step": 12, "final_loss": 0.25, "stopped_early": True}
    manager.clear_done()
    assert manager.done() is None
    # Only global rank 0 writes.
    CheckpointManager(tmp_path, keep_last=1, info=DistInfo(global_rank=1, world_size=2)).mark_done(3, None)
    assert manager.done() is None


# ---------------------------------------------------------------------------------------------- StopPolicy
def test_stop_policy_decisions():
    policy = StopPolicy(total_steps=10, checkpoint_every_steps=3, max_steps_per_launch=4)
    policy.start(2)  # this launch resumed after step 2
    d = {step: policy.after_step(step, stop_requested=False) for step in (3, 4, 5)}
    assert (d[3].save, d[3].stop) == (True, False) and (d[4].save, d[4].stop) == (False, False)
    assert not d[5].save and not d[5].stop
    limit = policy.after_step(6, stop_requested=False)
    assert limit.save and limit.stop and limit.status == "preempted" and "max_steps_per_launch=4" in limit.why
    signalled = policy.after_step(5, stop_requested=True)
    assert signalled.save and signalled.status == "preempted" and "stop signal" in signalled.why
    early = policy.after_step(5, stop_requested=False, stop_early=True)
    assert early.save and early.status == "completed" and early.stopped_early
    end = policy.after_step(10, stop_requested=True)  # a signal at the last step: the run is complete anyway
    assert end.save and end.status == "completed" and not end.stopped_early
    assert not policy.covered_by(None) and not policy.covered_by({"step": 9})
    assert policy.covered_by({"step": 10}) and policy.covered_by({"step": 4, "stopped_early": True})


def test_stop_policy_installs_once_and_gives_the_previous_handler_back():
    def mine(signum, frame):
        pass

    original = signal.signal(signal.SIGUSR2, mine)
    try:
        policy = StopPolicy(10, 5, stop_signals=["SIGUSR2"])
        policy.install()
        policy.install()  # a second install (training, then the test pass) must not bury the original handler
        assert signal.getsignal(signal.SIGUSR2) == policy.flag._handle
        policy.restore()
        assert signal.getsignal(signal.SIGUSR2) is mine
    finally:
        signal.signal(signal.SIGUSR2, original)


def test_early_stopping_counts_patience_from_the_best_value():
    es = EarlyStopping(patience=20, min_delta=0.1)
    assert es.update(1.0, 10) and es.best == 1.0 and not es.should_stop
    assert not es.update(0.95, 20)  # better, but not by more than min_delta
    assert not es.update(float("nan"), 25) and not es.should_stop
    assert es.update(0.5, 30) and es.best_at == 30
    assert not es.update(0.6, 50) and es.should_stop  # 20 steps without improvement
    again = EarlyStopping(patience=20)
    again.load_state_dict(es.state_dict())
    assert (again.best, again.best_at) == (0.5, 30)
    # Never a finite value: the patience runs from the start.
    none = EarlyStopping(patience=2)
    none.update(math.inf, 1)
    assert not none.should_stop and (none.update(math.nan, 2), none.should_stop) == (False, True)
    assert steps_per_epoch(12, 4) == 3 and steps_per_epoch(13, 4) == 4 and steps_per_epoch(3, 4) == 1


# ----------------------------------------------------------------------------------------------- Evaluator
class _Pairs(Dataset):
    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.x[i].sum(0, keepdim=True)}


class _AbsError:
    def __init__(self):
        self.total, self.n = 0.0, 0

    def update(self, outputs, labels):
        self.total += float((outputs - labels).abs().sum())
        self.n += labels.numel()

    def all_reduce(self):
        pass

    def compute(self):
        return {"mae": self.total / self.n, "n": self.n}


def _evaluator(stop: StopFlag | None = None) -> tuple[Evaluator, nn.Module]:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    model.train()
    strategy = SimpleNamespace(model=model, full_state_dict=lambda: {k: v.clone() for k, v in model.state_dict().items()})
    return Evaluator(strategy, ONE, bf16=False, batch_size=3, num_workers=0, stop=stop), model


def test_evaluator_mean_covers_the_whole_set_and_restores_train_mode():
    ev, model = _evaluator()
    data = _Pairs(7)  # batches of 3, 3, 1
    got = ev.mean(data, lambda out, batch: (float(((out - batch["label"]) ** 2).sum()), batch["label"].numel()))
    with torch.no_grad():
        want = float(((model(data.x) - data.x.sum(1, keepdim=True)) ** 2).mean())
    assert got == pytest.approx(want, rel=1e-6) and model.training
    assert math.isnan(ev.mean(_Pairs(0), lambda out, batch: (0.0, 0)))
    assert ev.state_dict().keys() == model.state_dict().keys()


def test_evaluator_metrics_and_the_stop_vote():
    flag = StopFlag([])
    ev, model = _evaluator(flag)
    data = _Pairs(7)
    got = ev.metrics(data, _AbsError(), stoppable=True)
    with torch.no_grad():
        want = float((model(data.x) - data.x.sum(1, keepdim=True)).abs().mean())
    assert got["n"] == 7 and got["mae"] == pytest.approx(want, rel=1e-6)
    flag.request("test")
    with pytest.raises(EvaluationInterrupted, match="stop signal"):
        ev.metrics(data, _AbsError(), stoppable=True)
    assert ev.metrics(data, _AbsError())["n"] == 7  # validation-style passes do not vote


# ------------------------------------------------------------------------------------------ MetricsLogger
def test_metrics_logger_writes_log_jsonl_and_tensorboard_in_one_place(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    step_values = {"loss/total": 0.5, "loss/mse": 0.25, "lr": 1e-3, "grad_norm": None,
                   "perf/samples_per_s": 10.0, "perf/samples_per_s_per_gpu": 10.0, "perf/data_wait_frac": 0.1,
                   "mem/host_rss_peak_gib": 1.0}
    before = list(logging.getLogger("phileo.train").handlers)
    with MetricsLogger(tmp_path, 0, tensorboard=True) as metrics:
        metrics.open_writers(0)
        assert len(logging.getLogger("phileo.train").handlers) == len(before) + 2  # stderr and log.txt
        metrics.log_step(1, 2, step_values)
        metrics.log_step(2, 2, {**step_values, "loss/total": 0.4})
        metrics.log_eval(2, {"val/loss": 0.3})
        metrics.log_eval(2, {"test/rmse": 0.7})
    assert logging.getLogger("phileo.train").handlers == before  # the `with` block took its handlers away
    logged = read_metrics(tmp_path)
    assert logged[1]["loss/total"] == 0.5 and "grad_norm" not in logged[1]
    # An evaluation line repeats the step's earlier scalars, so the later line (the one that counts) has them all.
    assert logged[2]["loss/total"] == 0.4 and logged[2]["val/loss"] == 0.3 and logged[2]["test/rmse"] == 0.7
    log_txt = (tmp_path / "log.txt").read_text()
    assert "step 1/2 | loss 0.5 | lr 0.001 | grad_norm n/a" in log_txt and "step 2: test/rmse 0.7" in log_txt
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss/total")] == [(1, 0.5), (2, pytest.approx(0.4))]
    assert [e.step for e in acc.Scalars("test/rmse")] == [2] and [e.step for e in acc.Scalars("val/loss")] == [2]
    # A later launch (the test pass after a requeue) merges with what the file holds for the step.
    with MetricsLogger(tmp_path, 0, tensorboard=False) as metrics:
        metrics.open_writers(2)
        metrics.log_eval(2, {"test/mae": 0.1})
    assert read_metrics(tmp_path)[2] == {**logged[2], "test/mae": 0.1, "time": read_metrics(tmp_path)[2]["time"]}


def test_metrics_logger_writes_nothing_on_other_ranks(tmp_path):
    with MetricsLogger(tmp_path, 1, tensorboard=True) as metrics:
        metrics.open_writers(0)
        metrics.log_step(1, 1, {"loss/total": 1.0, "lr": 1.0, "perf/samples_per_s": 1.0,
                                "perf/samples_per_s_per_gpu": 1.0, "perf/data_wait_frac": 0.0,
                                "mem/host_rss_peak_gib": 1.0})
    assert list(tmp_path.iterdir()) == []


def test_throughput_window_from_known_times():
    window = ThroughputWindow(world_batch=8, world_size=2, device="cpu", flops_per_sample=1e10,
                              peak_tflops_per_device=1.0)
    window.add(0.5, 0.1)
    window.add(0.5, 0.1)
    s = window.scalars()
    assert s["perf/samples_per_s"] == pytest.approx(16.0) and s["perf/samples_per_s_per_gpu"] == pytest.approx(8.0)
    assert s["perf/step_time_s"] == pytest.approx(0.5) and s["perf/data_wait_s"] == pytest.approx(0.1)
    assert s["perf/data_wait_frac"] == pytest.approx(0.2) and s["perf/mfu"] == pytest.approx(8 * 1e10 / 1e12)
    assert s["mem/host_rss_peak_gib"] > 0 and window.steps == 0  # a new window starts
    assert "perf/mfu" not in ThroughputWindow(8, 2, "cpu", None, None).scalars()


# ------------------------------------------------------------------------------------------- build_config
def test_one_builder_layers_defaults_base_file_and_overrides(tmp_path):
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump({"optim": {"lr": 3e-4}, "data": {"batch_size": 8}}))
    cfg = build_config(PretrainConfig, f, ["data.batch_size=16", "train.steps=7"],
                       base={"data": {"num_workers": 1, "batch_size": 2}, "optim": {"lr": 1.0}})
    assert (cfg.optim.lr, cfg.data.batch_size, cfg.data.num_workers, cfg.train.steps) == (3e-4, 16, 1, 7)
    assert to_dict(build_config(PretrainConfig)) == to_dict(PretrainConfig())
    f.write_text("optim:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"job.yaml: .*lrr"):
        build_config(PretrainConfig, f)


def test_one_builder_resumes_from_a_run_folder(tmp_path):
    run = tmp_path / "run"
    save_config(build_config(FinetuneConfig, overrides=["data.task=lc", "run.dir=/elsewhere"]), run / "config.yaml")
    cfg = build_config(FinetuneConfig, overrides=["data.n_shot=5"], resume_dir=run)
    assert (cfg.data.task, cfg.data.n_shot, cfg.run.dir) == ("lc", 5, str(run))
    with pytest.raises(ConfigError, match="--resume .*nowhere: no config.yaml there"):
        build_config(PretrainConfig, resume_dir=tmp_path / "nowhere")


def test_job_configs_share_the_engine_sections():
    for schema in (PretrainConfig, FinetuneConfig):
        cfg = schema()
        assert isinstance(cfg, JobConfig) and isinstance(cfg.data, LoaderConfig)
        for name in ("model", "optim", "train", "checkpoint", "run"):
            assert isinstance(getattr(cfg, name), type(getattr(JobConfig(), name))), (schema.__name__, name)
    ft = to_dict(FinetuneConfig())
    # The fine-tuning recipe's own defaults survive the shared schema (keys users pass today).
    assert ft["optim"]["lr"] == 1e-3 and ft["optim"]["lr_scaling"] == "sqrt" and ft["train"]["grad_clip_norm"] == 0
    assert ft["model"]["init"] == "scratch" and ft["data"]["eval_batch_size"] == 0 and "finetune" in ft
    assert json.dumps(ft)  # plain data


# ---------------------------------------------------------------- checkpoint manifests, skip-bad, retention
def _flip_bytes(path: Path, offset: int = 200, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, min(offset + n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_manifest_lists_every_file_and_verify_catches_flips_and_truncation(tmp_path):
    strategy = _strategy(0)
    manager = CheckpointManager(tmp_path, keep_last=3, info=ONE)
    folder = _save(manager, strategy, 2)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["step"] == 2 and sorted(manifest["files"]) == ["model.pt", "optimizer.pt", "rank_00000.pt",
                                                                    "trainer.pt"]
    assert all(v["size"] == (folder / k).stat().st_size for k, v in manifest["files"].items())
    assert ckpt_io.verify_checkpoint(folder) == []
    _flip_bytes(folder / "optimizer.pt")
    assert ckpt_io.verify_checkpoint(folder) == ["optimizer.pt does not match its checksum (corrupt)"]
    # Without the manifest it reads as a checkpoint of the layout before manifests (presence only) ...
    (folder / "manifest.json").unlink()
    assert manager.list() == [(2, folder)] and ckpt_io.verify_checkpoint(folder) == []
    # ... and without trainer.pt too, as an unfinished copy, which is never listed.
    (folder / "trainer.pt").unlink()
    assert manager.list() == [] and ckpt_io.unlisted_checkpoints(tmp_path) == [folder]


@pytest.mark.parametrize("damage", ["truncate", "trainer_missing", "flip"])
def test_a_bad_newest_checkpoint_is_set_aside_and_the_previous_one_resumes(tmp_path, damage, caplog):
    saved = _strategy(0)
    manager = CheckpointManager(tmp_path, keep_last=3, info=ONE)
    _train_one_step(saved)
    good = _save(manager, saved, 2)
    _train_one_step(saved)
    bad = _save(manager, saved, 4)
    if damage == "truncate":
        model = bad / "model.pt"
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    elif damage == "trainer_missing":
        (bad / "trainer.pt").unlink()
    else:
        _flip_bytes(bad / "model.pt")
    fresh_manager = CheckpointManager(tmp_path, keep_last=3, info=ONE)  # a new launch: nothing cached
    with caplog.at_level(logging.WARNING, logger="phileo.train"):
        assert fresh_manager.latest() == good
    assert "step_00000004 is unusable" in caplog.text and "resuming from the previous one" in caplog.text
    assert not bad.exists() and (tmp_path / "checkpoints" / "step_00000004.corrupt").is_dir()
    resumed = fresh_manager.load(good, _strategy(5), expect_strategy="ddp")
    assert resumed.step == 2


def test_retention_keeps_the_last_verified_checkpoint_until_its_successor_verifies(tmp_path):
    strategy = _strategy(0)
    manager = CheckpointManager(tmp_path, keep_last=1, info=ONE)
    first = _save(manager, strategy, 2)
    second = _save(manager, strategy, 4)
    assert manager.list() == [(4, second)] and not first.exists()  # the successor verified: the old one goes
    _flip_bytes(second / "model.pt")  # bit rot after the save, seen by a new launch
    later = CheckpointManager(tmp_path, keep_last=1, info=ONE)
    assert later.prune() == [] and second.exists()  # nothing verified newer: nothing may go
    assert later.latest() is None  # the only one is bad: set aside, start afresh (said in the log)


def _tmpfs(path: Path, size: str) -> None:
    """Mounts a tmpfs of `size` on `path` (root); a failed mount fails the test with mount's own words."""
    import subprocess

    path.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        pytest.fail(f"mount -t tmpfs on {path} failed as root: {res.stderr.strip()}")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="mounting the small tmpfs needs root (CI runs as root)")
def test_disk_full_during_a_save_is_named_and_the_previous_checkpoint_stays(tmp_path):
    """A real full file system (a 1 MiB tmpfs; needs root): ENOSPC names the path and the free space, the
    half-written folder goes, the previous checkpoint still verifies."""
    import subprocess

    small = tmp_path / "small"
    _tmpfs(small, "1m")
    try:
        manager = CheckpointManager(small, keep_last=2, info=ONE)
        torch.manual_seed(0)
        small_model = build_strategy(nn.Linear(4, 2), ONE, TrainConfig(device="cpu"), OptimConfig(), 4, False)
        first = _save(manager, small_model, 1)
        big = build_strategy(nn.Linear(512, 512), ONE, TrainConfig(device="cpu"), OptimConfig(), 4, False)
        with pytest.raises(OSError, match=r"No space left on device writing checkpoint .*\.step_00000002\.tmp "
                                          r"\(.* free of 1\.0 MiB under .*small.*previous one .*step_00000001"):
            _save(manager, big, 2)
        assert manager.list() == [(1, first)] and ckpt_io.verify_checkpoint(first) == []
        assert not ckpt_io.tmp_checkpoint_dir(small, 2).exists()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_a_checkpoint_written_before_manifests_is_still_resumed_from(tmp_path):
    """A campaign running across the upgrade keeps its progress: a step folder with model.pt and trainer.pt but
    no manifest (the old layout) is listed and verifies; one without trainer.pt (an unfinished copy) is not."""
    from phileo.train.checkpoint import (MANIFEST_FILE, is_legacy_checkpoint, latest_checkpoint, list_checkpoints,
                                         unlisted_checkpoints, verify_checkpoint)

    root = tmp_path / "checkpoints"
    old = root / "step_00000010"
    old.mkdir(parents=True)
    (old / "model.pt").write_bytes(b"m")
    (old / "trainer.pt").write_bytes(b"t")
    partial = root / "step_00000020"
    partial.mkdir()
    (partial / "model.pt").write_bytes(b"m")
    assert not (old / MANIFEST_FILE).exists() and is_legacy_checkpoint(old) and not is_legacy_checkpoint(partial)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10] and latest_checkpoint(tmp_path) == old
    assert verify_checkpoint(old) == [] and unlisted_checkpoints(tmp_path) == [partial]
