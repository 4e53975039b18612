"""Engine components alone, in-process and fast: layout detection, schedule, DeepSpeed config, checkpoint folders,
the foundation loss and its views, the resumable sampler, stop signals, the config."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from phileo.config import ConfigError, apply_overrides, load_config, save_config
from phileo.train import checkpoint as ckpt_io
from phileo.train.config import LossConfig, OptimConfig, PretrainConfig, TrainConfig
from phileo.train.deepspeed_config import make_deepspeed_config
from phileo.train.dist import detect_layout, expand_hostlist, expand_tasks_per_node, port_for_job
from phileo.train.loader import EpochIndexed, ResumableSampler
from phileo.train.loss import FoundationLoss, make_views, random_erase, soft_cross_entropy
from phileo.train.optim import build_scheduler, lr_factor, param_groups, scaled_lr
from phileo.train.signals import StopFlag

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ layout
def test_torchrun_layout_gives_node_rank_from_group_rank():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
           "MASTER_ADDR": "host-a", "MASTER_PORT": "29400"}
    info = detect_layout(env)
    assert (info.global_rank, info.world_size, info.local_rank, info.local_world_size) == (5, 8, 1, 4)
    assert (info.node_rank, info.num_nodes, info.master_addr, info.master_port) == (1, 2, "host-a", 29400)
    assert info.source == "torchrun" and not info.is_main


def test_srun_layout_takes_master_from_first_host_and_port_from_job_id():
    env = {"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_NODEID": "1",
           "SLURM_NNODES": "2", "SLURM_STEP_ID": "0", "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
           "SLURM_JOB_NODELIST": "lrdn[0031-0032]", "SLURM_JOB_ID": "123456"}
    info = detect_layout(env)
    assert info.source == "slurm"
    assert (info.global_rank, info.world_size, info.local_rank, info.local_world_size) == (6, 8, 2, 4)
    assert (info.node_rank, info.num_nodes) == (1, 2)
    assert info.master_addr == "lrdn0031"
    assert info.master_port == port_for_job("123456")
    # Every task of the job computes the same port on its own; a different job gets another one.
    assert port_for_job("123457") != info.master_port and 20000 <= info.master_port < 30000


def test_under_srun_slurms_variables_win_unless_torchrun_started_the_process():
    srun = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "5",
            "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NODEID": "1", "SLURM_NNODES": "2"}
    inherited = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "29555"}  # left over from the submitting shell
    info = detect_layout({**srun, **inherited})
    assert (info.source, info.global_rank, info.world_size) == ("slurm", 1, 2)
    # `srun torchrun ...`: torchrun placed this worker (TORCHELASTIC_RUN_ID), so its variables are the layout.
    worker = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "j5"}
    info = detect_layout({**srun, **worker})
    assert (info.source, info.global_rank, info.world_size, info.local_rank) == ("torchrun", 3, 4, 1)


def test_batch_script_without_srun_step_is_a_single_process():
    # sbatch's batch shell has SLURM_PROCID=0 and SLURM_NTASKS=N but no step: waiting for N-1 peers would hang.
    info = detect_layout({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"})
    assert (info.source, info.world_size, info.global_rank) == ("single", 1, 0)


def test_inconsistent_rank_variables_are_refused():
    with pytest.raises(RuntimeError, match="outside world size"):
        detect_layout({"RANK": "4", "WORLD_SIZE": "4"})


@pytest.mark.parametrize("hostlist, hosts", [
    ("node[1-3]", ["node1", "node2", "node3"]),
    ("gpu[001-002,007],login1", ["gpu001", "gpu002", "gpu007", "login1"]),
    ("a1,b2", ["a1", "b2"]),
    ("lrdn0031", ["lrdn0031"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("4(x2),3") == [4, 4, 3]
    with pytest.raises(ValueError):
        expand_tasks_per_node("four")


# ------------------------------------------------------------------------------------------ optimizer/LR
def test_warmup_then_cosine_schedule():
    total, warmup = 100, 10
    f = [lr_factor(s, total, warmup, 0.1) for s in range(total)]
    assert f[0] == pytest.approx(1 / warmup)  # never a zero-LR first step
    assert f[warmup - 1] == pytest.approx(1.0) and f[warmup] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:warmup], f[1:warmup]))
    assert all(a >= b for a, b in zip(f[warmup:], f[warmup + 1:]))
    assert f[-1] == pytest.approx(0.1)
    mid = warmup + (total - 1 - warmup) / 2
    assert lr_factor(int(mid), total, warmup, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * int(mid - warmup)
                                                                                  / (total - 1 - warmup))))


def test_scheduler_follows_a_raised_step_count_after_resume():
    model = nn.Linear(2, 2)
    cfg = OptimConfig(lr=1.0, warmup_steps=0)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    short = build_scheduler(opt, cfg, total_steps=10)
    for _ in range(5):
        opt.step()
        short.step()
    state = short.state_dict()
    opt2 = torch.optim.SGD(model.parameters(), lr=1.0)
    longer = build_scheduler(opt2, cfg, total_steps=100)
    longer.load_state_dict(state)
    opt2.step()
    longer.step()
    # The schedule of the new length applies: step 6 of 100, not of 10.
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr_factor(6, 100, 0, 0.0))


def test_lr_scaling_with_world_size():
    assert scaled_lr(OptimConfig(lr=1e-4, lr_scaling="sqrt"), 16) == pytest.approx(4e-4)
    assert scaled_lr(OptimConfig(lr=1e-4, lr_scaling="linear"), 16) == pytest.approx(1.6e-3)
    assert scaled_lr(OptimConfig(lr=1e-4), 16) == pytest.approx(1e-4)


def test_param_groups_exempt_biases_and_norms_and_skip_frozen():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    groups = param_groups(model, OptimConfig(weight_decay=0.05))
    decayed = {id(p) for p in groups[0]["params"]}
    exempt = {id(p) for p in groups[1]["params"]}
    assert decayed == {id(model[0].weight)}
    assert exempt == {id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[2].bias)}
    assert groups[1]["weight_decay"] == 0.0
    everything = param_groups(model, OptimConfig(weight_decay=0.05, decay_norm_and_bias=False))
    assert len(everything) == 1 and len(everything[0]["params"]) == 5


# ------------------------------------------------------------------------------------------ DeepSpeed
@pytest.mark.parametrize("strategy, stage", [("zero1", 1), ("zero2", 2), ("zero3", 3)])
def test_deepspeed_config_from_job_config(strategy, stage):
    train = TrainConfig(strategy=strategy, grad_accum_steps=3, grad_clip_norm=0.5)
    ds = make_deepspeed_config(train, micro_batch_size=4, world_size=8, bf16=True)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_batch_size"] == 4 * 3 * 8
    assert ds["gradient_accumulation_steps"] == 3 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    assert "offload_optimizer" not in ds["zero_optimization"]
    assert "bf16" not in make_deepspeed_config(train, 4, 8, bf16=False)


def test_deepspeed_offload_settings_and_their_validation():
    ds = make_deepspeed_config(TrainConfig(strategy="zero3", offload="optimizer_and_params"), 2, 4, bf16=True)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    with pytest.raises(ConfigError, match="ZeRO strategy"):
        apply_overrides(PretrainConfig(), ["train.offload=optimizer"])  # ddp
    with pytest.raises(ConfigError, match="zero3"):
        apply_overrides(PretrainConfig(), ["train.strategy=zero2", "train.offload=optimizer_and_params"])


# ------------------------------------------------------------------------------------------ config
def test_config_keys_the_launcher_sets_and_yaml_round_trip(tmp_path):
    cfg = apply_overrides(PretrainConfig(), [
        "model.name=phileo_vit_tiny", "data.root=/scratch/shards", "data.batch_size=16", "data.num_workers=2",
        "train.steps=500", "train.strategy=zero2", "train.seed=3", "train.precision=bf16",
        "train.grad_accum_steps=2", "run.dir=/scratch/run", "checkpoint.every_steps=50", "checkpoint.keep_last=2",
        "optim.lr=3e-5", "model.overrides={img_size: 64}"])
    assert cfg.train.strategy == "zero2" and cfg.optim.lr == pytest.approx(3e-5)
    assert cfg.model.overrides == {"img_size": 64}
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(PretrainConfig, tmp_path / "config.yaml")
    assert again == cfg
    with pytest.raises(ConfigError, match="train.strategy"):
        apply_overrides(PretrainConfig(), ["train.strategy=fsdp"])
    with pytest.raises(ConfigError, match="stop_signals"):
        apply_overrides(PretrainConfig(), ["train.stop_signals=[SIGNOPE]"])


# ------------------------------------------------------------------------------------------ checkpoints
def _fake_ckpt(run: Path, name: str, complete: bool = True) -> Path:
    d = run / "checkpoints" / name
    d.mkdir(parents=True)
    if complete:
        for part in ("model.pt", "trainer.pt"):
            (d / part).write_bytes(b"x")
        if name.startswith("step_"):
            ckpt_io.write_manifest(d, int(name[5:]))
    return d


def test_latest_checkpoint_is_chosen_by_step_number_not_name(tmp_path):
    assert ckpt_io.latest_checkpoint(tmp_path) is None
    _fake_ckpt(tmp_path, "step_9")
    _fake_ckpt(tmp_path, "step_10")
    _fake_ckpt(tmp_path, "step_11", complete=False)  # no manifest: not complete
    _fake_ckpt(tmp_path, ".step_00000012.tmp")  # being written
    assert ckpt_io.latest_checkpoint(tmp_path).name == "step_10"
    assert [s for s, _ in ckpt_io.list_checkpoints(tmp_path)] == [9, 10]


def test_prune_keeps_the_newest_and_stale_tmp_is_removed(tmp_path):
    for s in (100, 200, 300, 1000):
        _fake_ckpt(tmp_path, f"step_{s:08d}")
    tmp = _fake_ckpt(tmp_path, ".step_00001100.tmp")
    deleted = ckpt_io.prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in deleted) == ["step_00000100", "step_00000200"]
    assert [s for s, _ in ckpt_io.list_checkpoints(tmp_path)] == [300, 1000]
    assert ckpt_io.remove_stale_tmp(tmp_path) == [tmp] and not tmp.exists()


def test_commit_replaces_an_existing_checkpoint_of_the_same_step(tmp_path):
    old = _fake_ckpt(tmp_path, "step_00000005")
    (old / "marker").write_text("old")
    tmp = ckpt_io.prepare_tmp_dir(tmp_path, 5)
    (tmp / "model.pt").write_bytes(b"new")
    final = ckpt_io.commit_tmp_dir(tmp, ckpt_io.checkpoint_dir(tmp_path, 5))
    assert (final / "model.pt").read_bytes() == b"new" and not (final / "marker").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000005"]
    assert (final / "model.pt").stat().st_mode & 0o040  # group-readable


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = ckpt_io.capture_rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    ckpt_io.restore_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]


# ------------------------------------------------------------------------------------------ loss and views
def test_views_are_reproducible_and_targets_are_the_flipped_clean_images():
    images = torch.rand(3, 10, 32, 32)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    v1, t1 = make_views(images, g1)
    v2, t2 = make_views(images, g2)
    assert torch.equal(v1, v2) and torch.equal(t1, t2)
    assert v1.shape == (6, 10, 32, 32)
    flips = [images, images.flip(-1), images.flip(-2), images.flip(-1).flip(-2)]
    for i in range(6):
        assert any(torch.equal(t1[i], f[i % 3]) for f in flips)  # each target is one flip of its sample
    # The two views of a sample differ (independent erasing), and each erased the asked-for share.
    assert not torch.equal(v1[0], v1[3])
    changed = (v1 != t1).any(dim=1).float().mean(dim=(1, 2))
    assert ((changed > 0.2) & (changed < 0.55)).all(), changed


def test_erased_fraction_follows_the_configured_range():
    images = torch.full((64, 1, 40, 40), 2.0)  # outside [0, 1]: every erased pixel changes
    out = random_erase(images, torch.Generator().manual_seed(0), (0.3, 0.3))
    frac = (out != images).float().mean(dim=(1, 2, 3))
    assert frac.mean().item() == pytest.approx(0.3, abs=0.03)
    assert ((out <= 1) | (out == 2)).all()


def _outputs(b: int, n_views: int = 2, emb=None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    n = b * n_views
    return {"reconstruction": torch.rand(n, 10, 8, 8, generator=g), "coords": torch.rand(n, 4, generator=g),
            "clouds": torch.randn(n, 4, generator=g), "buildings": torch.rand(n, 1, generator=g),
            "landcover": torch.randn(n, 11, generator=g),
            "embedding": emb if emb is not None else torch.randn(n, 16, generator=g)}


def test_foundation_loss_terms_match_their_definitions():
    b = 3
    out = _outputs(b)
    g = torch.Generator().manual_seed(2)
    cloud = torch.softmax(torch.randn(b, 4, generator=g), -1)
    targets = {"images": torch.rand(2 * b, 10, 8, 8, generator=g), "coords": torch.rand(b, 4, generator=g),
               "cloud_fraction": cloud}
    loss_fn = FoundationLoss(LossConfig())
    total, terms = loss_fn(out, targets)
    assert set(terms) == {"reconstruction", "coords", "clouds", "embedding_positive", "embedding_negative",
                          "embedding_distance"}
    assert terms["reconstruction"].item() == pytest.approx(((out["reconstruction"] - targets["images"]) ** 2)
                                                           .mean().item(), rel=1e-6)
    manual_ce = -(torch.cat([cloud, cloud]) * torch.log_softmax(out["clouds"], -1)).sum(-1).mean()
    assert terms["clouds"].item() == pytest.approx(manual_ce.item(), rel=1e-6)
    e1, e2 = out["embedding"][:b], out["embedding"][b:]
    cos = lambda x, y: (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))  # noqa: E731
    assert terms["embedding_positive"].item() == pytest.approx((1 - cos(e1, e2)).mean().item(), rel=1e-5)
    neg = torch.stack([cos(e1[i], e2[(i - 1) % b]) for i in range(b)]).clamp(min=0).mean()
    assert terms["embedding_negative"].item() == pytest.approx(neg.item(), rel=1e-5, abs=1e-7)
    cfg = LossConfig()
    expected = sum(getattr(cfg, k) * v for k, v in terms.items())
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_cloud_target_counts_every_class():
    # The reference divided the mask by 10000 before comparing with the classes: only class 0 ever counted,
    # so predicting "all clear" was optimal. Here a cloudy target makes "all clear" expensive.
    cloudy = torch.tensor([[0.1, 0.6, 0.2, 0.1]])
    all_clear = torch.tensor([[10.0, -10.0, -10.0, -10.0]])
    matching = torch.log(cloudy)
    assert soft_cross_entropy(all_clear, cloudy).item() > 5 * soft_cross_entropy(matching, cloudy).item()


def test_negatives_never_pair_a_sample_with_its_own_view():
    # Identical views with orthogonal samples: a self-pair would make the negative term 1, the true one 0.
    b = 3
    e = torch.eye(b, 8)
    out = _outputs(b, emb=torch.cat([e, e]))
    targets = {"images": torch.rand(2 * b, 10, 8, 8), "coords": torch.rand(b, 4),
               "cloud_fraction": torch.full((b, 4), 0.25)}
    _, terms = FoundationLoss()(out, targets)
    assert terms["embedding_negative"].item() == pytest.approx(0.0, abs=1e-7)
    assert terms["embedding_positive"].item() == pytest.approx(0.0, abs=1e-6)


def test_auxiliary_terms_are_weighted_by_valid_fraction():
    b = 2
    out = _outputs(b)
    base = {"images": torch.rand(2 * b, 10, 8, 8), "coords": torch.rand(b, 4),
            "cloud_fraction": torch.full((b, 4), 0.25), "buildings": torch.rand(b, 1),
            "landcover": torch.softmax(torch.randn(b, 11), -1)}
    _, full = FoundationLoss()(out, {**base, "aux_valid_fraction": torch.ones(b)})
    _, none = FoundationLoss()(out, {**base, "aux_valid_fraction": torch.zeros(b)})
    assert full["buildings"].item() > 0 and full["landcover"].item() > 0
    assert none["buildings"].item() == 0 and none["landcover"].item() == 0
    with pytest.raises(KeyError, match="cloud_fraction"):
        FoundationLoss()(out, {"images": base["images"], "coords": base["coords"]})


# ------------------------------------------------------------------------------------------ data order
def test_sampler_resumes_exactly_and_ranks_are_disjoint():
    full = ResumableSampler(10, replica=0, num_replicas=2, seed=3)
    stream = [x for _, x in zip(range(23), iter(full))]
    resumed = ResumableSampler(10, replica=0, num_replicas=2, seed=3, start_sample=13)
    assert [x for _, x in zip(range(10), iter(resumed))] == stream[13:23]
    other = ResumableSampler(10, replica=1, num_replicas=2, seed=3)
    first_epoch = {i for (e, i) in [x for _, x in zip(range(5), iter(full))]}
    other_epoch = {i for (e, i) in [x for _, x in zip(range(5), iter(other))]}
    assert not first_epoch & other_epoch and len(first_epoch | other_epoch) == 10
    assert [e for e, _ in stream[:11]] == [0] * 5 + [1] * 5 + [2]
    with pytest.raises(ValueError, match="every rank needs"):
        ResumableSampler(1, replica=0, num_replicas=2)


def test_epoch_indexed_tells_the_dataset_its_epoch():
    class DS:
        def __init__(self):
            self.epoch = None

        def set_epoch(self, e):
            self.epoch = e

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return (self.epoch, i)

    wrapped = EpochIndexed(DS())
    assert wrapped[(0, 2)] == (0, 2) and wrapped[(3, 1)] == (3, 1)


# ------------------------------------------------------------------------------------------ signals
def test_stop_flag_only_sets_a_flag_and_restores_the_previous_handler():
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda s, f: seen.append(s))
    try:
        flag = StopFlag(["SIGUSR2", "SIGTERM"])
        assert flag.install()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert flag.requested and flag.signal_name == "SIGUSR2" and seen == []
        flag.restore()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert seen == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_cli_refuses_a_bad_config_before_touching_the_run_folder(tmp_path, capsys):
    from phileo.train.pretrain import main

    run = tmp_path / "run"
    assert main([f"run.dir={run}"]) == 2  # no data.root
    assert "data.root is not set" in capsys.readouterr().err
    assert main([f"run.dir={run}", "train.stratgy=ddp"]) == 2
    assert "Did you mean 'strategy'" in capsys.readouterr().err
    assert not run.exists()
