"""Resume on another number of processes (issue 14): the run's data layout and slots, the refusals, and real runs.

A run's global sample stream belongs to the run (phileo.train.loader): a 2-process run resumed on 1 process reads
the same samples with the same augmentation, so every later step logs the same loss as the uninterrupted
2-process run (up to float summation order), under ddp and under zero2 (DeepSpeed's universal checkpoint); a
1-process run with 2 accumulation steps resumes on 2 processes the same way. The pretraining version (2 nodes'
chunks read by one process) is in test_train_pretrain.py.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from phileo.config import ConfigError
from phileo.train import checkpoint as ckpt_io
from phileo.train.dist import DistInfo
from phileo.train.engine import StepContext, Trainer
from phileo.train.loader import (DataLayout, GroupIndexed, ResumableSampler, SlotBatchSampler, data_rank,
                                 plan_resume, start_layout)
from phileo.train.metrics import read_metrics
from test_engine import ToyTask, _spawn_ranks, toy_config

torch.set_num_threads(1)
STEPS, STOP_AT = 6, 3


# ------------------------------------------------------------------------------------------ the layout itself
def test_slots_are_the_identity_on_the_starting_layout_and_cover_every_slot_once_on_any_other():
    two = DataLayout((2,), micro_batch=4, grad_accum=1)
    assert [two.slots(r, 2) for r in range(2)] == [[(0, 0)], [(1, 0)]]
    assert two.slots(0, 1) == [(0, 0), (1, 0)]  # one process computes both streams' micro-batches
    assert (two.global_batch, two.virtual_ranks, two.accum_for(1)) == (8, 2, 2)
    one = DataLayout((1,), micro_batch=4, grad_accum=2)
    assert [one.slots(r, 2) for r in range(2)] == [[(0, 0)], [(0, 1)]]
    odd = DataLayout((2,), micro_batch=2, grad_accum=3)  # 6 micro-batches per step over 3 processes
    per_rank = [odd.slots(r, 3) for r in range(3)]
    assert per_rank == [[(0, 0), (0, 1)], [(0, 2), (1, 0)], [(1, 1), (1, 2)]]
    assert sorted(s for r in per_rank for s in r) == [(v, a) for v in range(2) for a in range(3)]
    nodes = DataLayout((2, 2), micro_batch=2, grad_accum=1)
    assert [nodes.group_of(v) for v in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_the_layout_round_trips_through_trainer_pt_fields():
    for layout in (DataLayout((4, 4), 8, 2), DataLayout((4, 3), 8, 1, from_step=10, from_sample=80)):
        d = layout.to_dict()
        assert DataLayout.from_dict(json.loads(json.dumps(d))) == layout
    assert DataLayout((4, 4), 8, 2).to_dict() == {"groups": 2, "replicas_per_group": 4, "micro_batch": 8,
                                                   "grad_accum": 2, "from_step": 0, "from_sample": 0}
    assert start_layout("node", 6, [4, 2], 8, 1).replicas == (4, 2)
    assert start_layout("world", 6, [4, 2], 8, 1).replicas == (6,)


def test_a_process_keeps_its_own_stream_on_the_starting_layout_whatever_the_rank_order():
    layout = DataLayout((2, 2), 4, 1)
    # srun with a cyclic distribution: global rank 1 sits on node 1
    odd = DistInfo(global_rank=1, world_size=4, local_rank=0, local_world_size=2, node_rank=1, num_nodes=2)
    assert data_rank(layout, "node", odd, [2, 2]) == 2
    assert data_rank(layout, "node", odd, [4]) == 1  # another layout: by global rank
    assert data_rank(DataLayout((4,), 4, 1), "world", odd, [2, 2]) == 1


def test_resume_plans_keep_the_global_batch_or_refuse_naming_what_works():
    run = DataLayout((2,), 4, 1)
    written = {"step": 3, "world_size": 2, "data_layout": run.to_dict(), "grad_accum_steps": 1}
    assert plan_resume(run, 2, None) == plan_resume(run, 2, written)  # first start and same layout: as is
    assert plan_resume(run, 2, written).note is None
    on_one = plan_resume(DataLayout((1,), 4, 1), 1, written)
    assert (on_one.layout, on_one.grad_accum, on_one.warn) == (run, 2, False)
    assert "train.grad_accum_steps 1 → 2 keeps the global batch of 8 (4 per micro-batch)" in on_one.note
    # the user already set the accumulation that keeps it; and back on 2 with the value of that launch
    assert plan_resume(DataLayout((1,), 4, 2), 1, written).grad_accum == 2
    back = plan_resume(DataLayout((2,), 4, 2), 2, {**written, "world_size": 1, "grad_accum_steps": 2})
    assert back.grad_accum == 1 and back.layout == run
    with pytest.raises(ConfigError, match=r"global batch of 8 = 2 stream\(s\) × 1 accumulation × 4 per "
                                          r"micro-batch cannot be kept on 3 processes.*\(1, 2\)"):
        plan_resume(DataLayout((3,), 4, 1), 3, written)
    with pytest.raises(ConfigError, match="data.batch_size=8, but this run was started with 4"):
        plan_resume(DataLayout((1,), 8, 1), 1, written)
    with pytest.raises(ConfigError, match="train.grad_accum_steps=3 would change .* kept with "
                                          "train.grad_accum_steps=2"):
        plan_resume(DataLayout((1,), 4, 3), 1, written)


def test_checkpoints_from_before_layouts_resume_as_they_did():
    old = {"step": 3, "world_size": 2, "data_layout": None, "grad_accum_steps": None}
    same = plan_resume(DataLayout((2,), 4, 1), 2, old)
    assert same.legacy_position and same.note is None and same.layout.from_step == 3
    other = plan_resume(DataLayout((1,), 4, 1), 1, old)
    assert other.warn and "start afresh at step 3" in other.note
    assert (other.layout.replicas, other.layout.position(3), other.layout.position(5)) == ((1,), 12, 20)


# ------------------------------------------------------------------------------------------ the batches
def _stream(layout: DataLayout, v: int, sizes: dict[int, int], seed: int, n_micro: int) -> list[list]:
    """v's first n_micro micro-batches, straight from its ResumableSampler (what the starting layout reads)."""
    g, replica = layout.group_of(v)
    it = iter(ResumableSampler(sizes[g], replica, layout.replicas[g], seed=seed, group=g))
    return [[(g, e, i) for e, i in (next(it) for _ in range(layout.micro_batch))] for _ in range(n_micro)]


def _take(sampler: SlotBatchSampler, n: int) -> list[list]:
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_every_layout_reads_the_same_micro_batches_of_the_same_streams():
    layout = DataLayout((2, 2), micro_batch=3, grad_accum=2)  # 2 nodes of 2, V=4, 8 micro-batches per step
    sizes, seed, steps = {0: 17, 1: 13}, 5, 4
    streams = {v: _stream(layout, v, sizes, seed, steps * 2) for v in range(4)}
    for world in (8, 4, 2, 1):
        accum = layout.accum_for(world)
        seen: dict[tuple[int, int, int], list] = {}
        for r in range(world):
            slots = layout.slots(r, world)
            batches = _take(SlotBatchSampler(layout, slots, sizes, seed), steps * accum)
            for k, keys in enumerate(batches):
                step, m = divmod(k, accum)
                v, a = slots[m]
                seen[(step, v, a)] = keys
        assert seen == {(s, v, a): streams[v][s * 2 + a] for s in range(steps) for v in range(4) for a in range(2)}
    # resuming after step 2 picks the streams up where they were
    resumed = _take(SlotBatchSampler(layout, layout.slots(0, 1), sizes, seed, start_step=2), 8)
    assert resumed == [streams[v][2 * 2 + a] for v in range(4) for a in range(2)]


def test_group_indexed_dispatches_to_each_groups_dataset_and_epoch():
    class DS:
        def __init__(self, name):
            self.name, self.epoch = name, None

        def set_epoch(self, e):
            self.epoch = e

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return (self.name, self.epoch, i)

    both = GroupIndexed({0: DS("a"), 1: DS("b")})
    assert len(both) == 8
    assert both[(1, 2, 3)] == ("b", 2, 3) and both[(0, 0, 1)] == ("a", 0, 1) and both[(1, 5, 0)] == ("b", 5, 0)


def test_augmentation_follows_the_slot_not_the_process():
    def draw(ctx):
        return torch.rand(3, generator=ctx.generator())

    original = StepContext(7, 1, 3, seed=11, device=torch.device("cpu"))  # rank 3, micro 1, before layouts
    assert torch.equal(draw(original), draw(StepContext(7, 1, 3, 11, torch.device("cpu"), 3, 1)))
    moved = StepContext(7, 5, 0, 11, torch.device("cpu"), virtual_rank=3, virtual_micro_step=1)
    assert torch.equal(draw(original), draw(moved))
    assert not torch.equal(draw(original), draw(StepContext(7, 1, 0, 11, torch.device("cpu"))))


def test_fine_tuning_sizes_its_epochs_by_the_runs_global_batch(tmp_path):
    from phileo.bench.config import FinetuneConfig
    from phileo.bench.finetune import derive_steps

    cfg = FinetuneConfig()
    assert derive_steps(cfg, 200, 4, global_batch=64)[1] == derive_steps(cfg, 200, 4)[1] == 4  # 16·4
    assert derive_steps(cfg, 200, 2, global_batch=64)[1] == 4  # resumed on 2 GPUs: still the run's 64
    assert ckpt_io.saved_data_layout(tmp_path) is None
    folder = ckpt_io.checkpoint_dir(tmp_path, 5)
    folder.mkdir(parents=True)
    ckpt_io.save_file({"model": {}}, folder / ckpt_io.MODEL_FILE)
    ckpt_io.save_file({"step": 5, "data_layout": DataLayout((4,), 16, 1).to_dict()}, folder / ckpt_io.TRAINER_FILE)
    assert DataLayout.from_dict(ckpt_io.saved_data_layout(tmp_path)).global_batch == 64


# ------------------------------------------------------------------------------------------ real runs
class AugmentedTask(ToyTask):
    """ToyTask with noise drawn from the step's generator: the losses then tell whether each micro-batch got its
    slot's augmentation (with split="world" every layout reads the same set of samples per step, so the data
    alone would not tell)."""

    def forward(self, model, batch, ctx):
        noise = torch.randn(batch["image"].shape, generator=ctx.generator())
        return model(batch["image"] + 0.5 * noise)


ZERO = ("zero1", "zero2", "zero3")


def _configs(base: Path) -> dict[str, object]:
    one = ("train.grad_accum_steps=2",)  # 1 process × 2 × 4 = 8, as 2 processes × 1 × 4
    stop = (f"train.max_steps_per_launch={STOP_AT}",)
    # sqrt LR scaling: the LR follows the run's streams, not this launch's processes (checked per step)
    common = (f"train.steps={STEPS}", "train.dist_timeout_s=60", "optim.lr=3e-2", "optim.lr_scaling=sqrt")
    cfgs = {"one": toy_config(base / "one", *common, *one),
            "one_1to2": toy_config(base / "one_1to2", *common, *one, *stop),
            "zero2_one": toy_config(base / "zero2_one", *common, *one, "train.strategy=zero2"),
            "zero2_1to2": toy_config(base / "zero2_1to2", *common, *one, "train.strategy=zero2", *stop)}
    for strategy in ("ddp", *ZERO):
        cfgs[strategy] = toy_config(base / strategy, *common, f"train.strategy={strategy}")
        cfgs[f"{strategy}_2to1"] = toy_config(base / f"{strategy}_2to1", *common, f"train.strategy={strategy}",
                                              *stop)
    return cfgs


def _worker() -> None:
    """One process of a launch (argv: base, phase). Phase "first", 1 process: the zero2 runs started on 1.
    Phase "both", 2 processes: the straight runs, the first launches of the runs that go on on 1 process, and
    the second launches of the runs started on 1. Phase "last", 1 process: the second launches of the runs
    started on 2. (DeepSpeed stays out of the test process.)"""
    cfgs = _configs(Path(sys.argv[1]))
    expect = {
        "first": {"zero2_one": "completed", "zero2_1to2": "preempted"},
        "both": {**{s: "completed" for s in ("ddp", *ZERO)}, **{f"{s}_2to1": "preempted" for s in ("ddp", *ZERO)},
                 "one_1to2": "completed", "zero2_1to2": "completed"},
        "last": {f"{s}_2to1": "completed" for s in ("ddp", *ZERO)},
    }[sys.argv[2]]
    for name, status in expect.items():
        result = Trainer(cfgs[name], AugmentedTask()).fit()
        assert result.status == status, (name, result)


def _launch(base: Path, phase: str, n: int) -> None:
    from phileo.train.dist import free_port

    procs = _spawn_ranks(["-c", "import test_resume_world_size as t; t._worker()", str(base), phase], n,
                         free_port(), {"DS_ACCELERATOR": "cpu"})
    deadline = time.monotonic() + 300
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0] * n, "\n".join(o[-3000:] for o in outputs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("resize")
    cfgs = _configs(base)
    assert Trainer(cfgs["one"], AugmentedTask()).fit().status == "completed"
    assert Trainer(cfgs["one_1to2"], AugmentedTask()).fit().step == STOP_AT
    _launch(base, "first", 1)
    _launch(base, "both", 2)
    _launch(base, "last", 1)
    return base


def _assert_same_run(resized: Path, straight: Path) -> None:
    a, b = read_metrics(straight), read_metrics(resized)
    later = range(STOP_AT + 1, STEPS + 1)
    assert [b[s]["loss/total"] for s in later] == pytest.approx([a[s]["loss/total"] for s in later], rel=1e-5)
    assert [b[s]["lr"] for s in later] == pytest.approx([a[s]["lr"] for s in later], rel=1e-6)
    wa = ckpt_io.load_model_state(straight / f"checkpoints/step_{STEPS:08d}")
    wb = ckpt_io.load_model_state(resized / f"checkpoints/step_{STEPS:08d}")
    for k in wa:
        assert float((wb[k] - wa[k]).detach().norm()) <= 1e-5 * float(wa[k].detach().norm()), k


@pytest.mark.slow
def test_a_two_process_ddp_run_resumed_on_one_process_logs_the_same_losses(runs):
    _assert_same_run(runs / "ddp_2to1", runs / "ddp")
    text = (runs / "ddp_2to1/log.txt").read_text()
    assert "train.grad_accum_steps 1 → 2 keeps the global batch of 8 (4 per micro-batch)" in text
    assert "process-global random streams (e.g. dropout) restart at step 3" in text
    trainer = torch.load(runs / f"ddp_2to1/checkpoints/step_{STEPS:08d}/trainer.pt", weights_only=False)
    assert trainer["data_layout"]["replicas_per_group"] == 2 and trainer["grad_accum_steps"] == 2
    assert trainer["world_size"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ZERO)
def test_a_two_process_zero_run_resumed_on_one_process_through_the_universal_checkpoint(runs, strategy):
    _assert_same_run(runs / f"{strategy}_2to1", runs / strategy)
    assert "universal checkpoint" in (runs / f"{strategy}_2to1/log.txt").read_text()
    assert not list((runs / f"{strategy}_2to1/checkpoints").glob(".*"))  # the scratch folder is gone
    ds_config = json.loads((runs / f"{strategy}_2to1/deepspeed_config.json").read_text())
    assert ds_config["gradient_accumulation_steps"] == 2 and ds_config["train_batch_size"] == 8


@pytest.mark.slow
@pytest.mark.parametrize("straight, resized", [("one", "one_1to2"), ("zero2_one", "zero2_1to2")])
def test_a_one_process_run_with_accumulation_resumes_on_two_processes(runs, straight, resized):
    _assert_same_run(runs / resized, runs / straight)
    assert "train.grad_accum_steps 2 → 1 keeps the global batch of 8" in (runs / resized / "log.txt").read_text()


@pytest.mark.slow
def test_a_refused_resume_changes_nothing_in_the_run_folder(runs, tmp_path):
    import shutil

    run = tmp_path / "refused"
    shutil.copytree(runs / "ddp_2to1", run, ignore=shutil.ignore_patterns("DONE"))
    config_before = (run / "config.yaml").read_text()
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match="data.batch_size=2, but this run was started with 4"):
        Trainer(toy_config(run, f"train.steps={STEPS}", "data.batch_size=2"), AugmentedTask()).fit()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert (run / "config.yaml").read_text() == config_before and not (run / "run.lock").exists()
    assert "data.batch_size=2, but this run was started with 4" in (run / "log.txt").read_text()
