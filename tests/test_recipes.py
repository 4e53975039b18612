"""`--recipe published`: the presets resolve to the published values under the user's own layers; a short CPU
pretraining under it trains at a constant LR, without clipping, with decay on every parameter, and stops early on
the training loss by the published rule; the published fine-tuning warm-up against torch's MultiStepLR as the
published trainer drove it; the frozen-stem rule; fp16 refused on CPU and its gradient scaler as far as a CPU
allows."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from phileo.bench.config import FinetuneConfig
from phileo.config import ConfigError, save_config, to_dict
from phileo.train import recipes
from phileo.train.config import PretrainConfig, build_config
from phileo.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups, scaled_lr

FAMILY_MODEL = {"cnn": "phileo_cnn_44m", "vit": "phileo_vit_100m"}


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _expected(common: dict, per_family: dict, family: str) -> dict:
    return {**common, **per_family[family]}


# ------------------------------------------------------------------------------------------ the presets
@pytest.mark.parametrize("family", ["cnn", "vit"])
def test_published_pretraining_preset_resolves_to_the_published_values(family):
    cfg = build_config(PretrainConfig, overrides=[f"model.name={FAMILY_MODEL[family]}"], recipe="published")
    assert cfg.recipe == "published"
    for key, value in _expected(recipes.PUBLISHED_PRETRAIN, recipes.PUBLISHED_PRETRAIN_FAMILY, family).items():
        assert _get(cfg, key) == value, key
    # What those values mean, checked through the components that use them (not the table again).
    assert scaled_lr(cfg.optim, 16) == pytest.approx(cfg.optim.lr * 4)  # lr·√world size
    sched = build_scheduler(torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0), cfg.optim, 5000)
    lrs = []
    for _ in range(5000):
        lrs.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    assert set(lrs) == {1.0}  # no warm-up, no decay
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    groups = param_groups(model, cfg.optim)
    assert len(groups) == 1 and len(groups[0]["params"]) == len(list(model.parameters()))
    assert groups[0]["weight_decay"] == 0.01
    assert cfg.train.grad_clip_norm == 0 and cfg.loss.embedding_negative == 0
    # The project's recipe stays the default.
    default = build_config(PretrainConfig, overrides=[f"model.name={FAMILY_MODEL[family]}"])
    assert default.recipe == "default" and default.optim.lr_scaling == "none" and default.train.grad_clip_norm == 1.0


@pytest.mark.parametrize("family", ["cnn", "vit"])
def test_published_finetuning_preset_resolves_to_the_published_values(family):
    cfg = build_config(FinetuneConfig, overrides={"model.name": FAMILY_MODEL[family]}, recipe="published")
    for key, value in _expected(recipes.PUBLISHED_FINETUNE, recipes.PUBLISHED_FINETUNE_FAMILY, family).items():
        assert _get(cfg, key) == value, key
    assert cfg.model.freeze_stem is (family == "cnn")


def test_the_users_layers_win_over_the_preset_and_a_resume_keeps_it(tmp_path):
    file = tmp_path / "pre.yaml"
    file.write_text("recipe: published\nmodel: {name: phileo_vit_100m}\ndata: {batch_size: 8}\n")
    cfg = build_config(PretrainConfig, file, ["optim.lr=5e-5"], flags={"train.steps": 77})
    assert cfg.recipe == "published"  # from the file's `recipe` key
    assert (cfg.data.batch_size, cfg.optim.lr, cfg.train.steps) == (8, 5e-5, 77)  # file, override, flag
    assert cfg.train.early_stop_patience_epochs == recipes.PUBLISHED_PRETRAIN_FAMILY["vit"][
        "train.early_stop_patience_epochs"]  # the preset below them
    # `recipe=published` as a plain override works the same as --recipe
    assert to_dict(build_config(PretrainConfig, overrides=["recipe=published", "model.name=phileo_vit_100m"])) == \
        to_dict(build_config(PretrainConfig, overrides=["model.name=phileo_vit_100m"], recipe="published"))
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    assert to_dict(build_config(PretrainConfig, resume_dir=run)) == {**to_dict(cfg), "run": {
        **to_dict(cfg)["run"], "dir": str(run)}}
    with pytest.raises(ConfigError, match="recipe"):
        build_config(PretrainConfig, recipe="publish")


def test_the_negative_embedding_term_was_exactly_zero_in_torch():
    """Why weight 0 reproduces the published loss: cosine_embedding_loss with target 0 is 0, for any inputs."""
    g = torch.Generator().manual_seed(0)
    e1, e2 = torch.randn(6, 32, generator=g, requires_grad=True), torch.randn(6, 32, generator=g)
    zero = F.cosine_embedding_loss(torch.flip(e1, dims=(0,)), e2, torch.zeros(6))
    assert zero.item() == 0.0
    zero.backward()
    assert e1.grad is None or torch.count_nonzero(e1.grad) == 0
    assert F.cosine_embedding_loss(e1, e2, -torch.ones(6)).item() > 0  # target -1 would have been a real term


# ---------------------------------------------------------------------- the engine's new switches, alone
def test_no_clipping_under_the_published_preset():
    """The optimizer sees the raw gradients (captured in a step pre-hook); the default recipe clips them to 1."""
    from phileo.train.dist import DistInfo
    from phileo.train.strategy import DDPStrategy

    info = DistInfo(0, 1, 0, 1, 0, 1, "cpu", "single")

    def run(cfg):
        torch.manual_seed(0)
        model = nn.Linear(8, 1)
        strategy = DDPStrategy(model, info, cfg.train, cfg.optim)
        seen = []
        strategy.optimizer.register_step_pre_hook(
            lambda opt, *_: seen.append(torch.cat([p.grad.flatten() for p in model.parameters()]).clone()))
        loss = 1000.0 * model(torch.ones(4, 8)).sum()
        strategy.backward(loss, True)
        raw = torch.cat([p.grad.flatten() for p in model.parameters()]).clone()
        norm = strategy.optimizer_step()
        return raw, seen[0], norm

    raw, seen, norm = run(build_config(PretrainConfig, recipe="published", overrides=["model.name=phileo_cnn_tiny"]))
    assert norm > 100 and torch.equal(seen, raw)
    raw, seen, norm = run(build_config(PretrainConfig, overrides=["model.name=phileo_cnn_tiny"]))
    assert norm > 100 and seen.norm().item() == pytest.approx(1.0, rel=1e-4)


def test_stop_policy_stops_on_the_training_loss_per_epoch():
    from phileo.train.stop import StopPolicy

    policy = StopPolicy(1000, 1000, early_stop_patience_epochs=2)
    policy.set_epoch_steps(3)
    # epoch means: 5, 4, 4.5, 4.2 -> best in epoch 2, no better in epochs 3 and 4: stop after step 12
    losses = [5, 5, 5, 4, 4, 4, 4.5, 4.5, 4.5, 4.2, 4.2, 4.2, 1, 1, 1]
    stopped = None
    for step, loss in enumerate(losses, start=1):
        d = policy.after_step(step, False, train_loss=loss)
        if d.stop:
            stopped = (step, d)
            break
    assert stopped is not None and stopped[0] == 12 and stopped[1].stopped_early and stopped[1].save
    assert "2 epochs" in stopped[1].why
    # the state resumes the count
    resumed = StopPolicy(1000, 1000, early_stop_patience_epochs=2)
    resumed.load_state_dict(policy.state_dict())
    assert resumed.train_loss_stop.best == 4.0 and resumed.train_loss_stop.best_at == 2


# -------------------------------------------------------------------------------------- a real CPU run
def _published_early_stop_epoch(epoch_means: list[float], patience: int) -> int:
    """The published early_stopper (train_model_ddp.py), re-implemented here: the epoch (0-based) it exits in."""
    best, counter = None, 0
    for epoch, loss in enumerate(epoch_means):
        score = -loss
        if best is None or not score < best:
            best, counter = score, 0
        else:
            counter += 1
            if counter >= patience:
                return epoch
    return -1


def test_a_short_cpu_run_under_the_published_recipe(tmp_path):
    from phileo.data import PretrainDataset
    from phileo.data.synthetic import make_pretrain_shards
    from phileo.train import checkpoint as ckpt_io
    from phileo.train.metrics import read_metrics
    from phileo.train.pretrain import FoundationTask, main

    torch.set_num_threads(1)
    shards = make_pretrain_shards(tmp_path / "data", n_cells=2)
    run = tmp_path / "run"
    patience = 2
    code = main(["--recipe", "published", "model.name=phileo_cnn_tiny", "model.overrides={img_size: 32}",
                 "data.patch_size=32", f"data.root={shards}", "data.num_workers=0", "train.device=cpu",
                 "train.steps=400", f"train.early_stop_patience_epochs={patience}", "run.log_every_steps=1",
                 "run.image_every_steps=0", "run.tensorboard=false", "checkpoint.every_steps=1000",
                 f"run.dir={run}"])
    assert code == 0
    cfg = build_config(PretrainConfig, resume_dir=run)
    assert cfg.recipe == "published" and cfg.data.batch_size == 4
    done = json.loads((run / "DONE").read_text())
    assert done["stopped_early"] and done["step"] < 400
    logged = read_metrics(run)
    rows = [logged[step] for step in sorted(logged) if "loss/total" in logged[step]]
    # constant LR: lr·√1, every step
    assert {r["lr"] for r in rows} == {scaled_lr(cfg.optim, 1)}
    # stopped where the published rule stops, on the epoch means of the logged training loss
    n = len(PretrainDataset(shards, patch_size=32))
    epoch_steps = math.ceil(n / cfg.data.batch_size)
    assert len(rows) == done["step"]
    losses = [r["loss/total"] for r in rows]
    means = [sum(losses[i:i + epoch_steps]) / epoch_steps for i in range(0, len(losses), epoch_steps)]
    assert done["step"] == (_published_early_stop_epoch(means, patience) + 1) * epoch_steps
    # decay on every trainable parameter: one group in the saved optimizer state
    latest = ckpt_io.latest_checkpoint(run)
    opt = torch.load(latest / "optimizer.pt", weights_only=False)["optimizer"]
    task = FoundationTask(cfg)
    task.train_dataset(type("Info", (), {"node_rank": 0, "num_nodes": 1})())
    trainable = [p for p in task.build_model().parameters() if p.requires_grad]
    assert [g["weight_decay"] for g in opt["param_groups"]] == [0.01]
    assert len(opt["param_groups"][0]["params"]) == len(trainable)
    # the negative term is computed and logged, and adds nothing
    r = rows[-1]
    parts = sum(getattr(cfg.loss, k[5:]) * v for k, v in r.items() if k.startswith("loss/") and k != "loss/total")
    assert "loss/embedding_negative" in r and parts == pytest.approx(r["loss/total"], rel=1e-6)


# ------------------------------------------------------------------------------------------ fine-tuning
def test_the_published_warmup_schedule():
    """Per-step LRs of the engine under --recipe published against the published trainer's own mechanism:
    lr / int(10**5) at the start and torch's MultiStepLR(milestones 1..5, gamma 10) stepped after each epoch."""
    from phileo.bench.finetune import derive_steps

    cfg = build_config(FinetuneConfig, overrides={"model.name": "phileo_cnn_44m"}, recipe="published")
    cfg, per_epoch = derive_steps(cfg, n_train=200, world_size=4)  # 200 / (16·4) -> 4 steps per epoch
    assert per_epoch == 4 and cfg.optim.warmup_stages == cfg.finetune.warmup_epochs == 5
    peak = scaled_lr(cfg.optim, 4)
    ours = build_scheduler(build_optimizer(nn.Linear(2, 1), cfg.optim, world_size=4), cfg.optim, cfg.train.steps)

    ref_opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=peak / int(10 ** 5), eps=1e-6)
    ref = torch.optim.lr_scheduler.MultiStepLR(ref_opt, milestones=list(range(1, 6)), gamma=10)
    for epoch in range(8):
        for _ in range(per_epoch):
            assert ours.get_last_lr()[0] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-9), epoch
            ours.optimizer.step()
            ours.step()
        ref_opt.step()
        if epoch < 5:  # train_base.py: `if epoch < self.warmup_epochs: s.step()`
            ref.step()
    assert ours.get_last_lr()[0] == pytest.approx(peak)
    assert [lr_factor(s, 100, 50, 1.0, "geometric", 10.0, 5) for s in (0, 9, 10, 49, 50)] == \
        pytest.approx([1e-5, 1e-5, 1e-4, 1e-1, 1.0])


@pytest.mark.parametrize("name", ["phileo_vit_tiny", "phileo_cnn_tiny"])
def test_the_frozen_stem_rule(name):
    from phileo.models import create_downstream_model

    family = recipes.model_family(name)
    cfg = build_config(FinetuneConfig, overrides={"model.name": name, "model.freeze_encoder": True},
                       recipe="published")
    model = create_downstream_model(name, num_outputs=1, freeze_encoder=True, freeze_stem=cfg.model.freeze_stem)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    stem = {n for n, _ in model.named_parameters() if n.startswith("stem.")}
    encoder = {n for n, _ in model.named_parameters() if n.startswith("encoder.")}
    assert stem and encoder and not (trainable & encoder)
    # published: phivit_upernet_pretrained freezes model.vit_encoder only; the CNN freezes all it loaded
    assert (stem <= trainable) is (family == "vit")
    assert not (stem & trainable) or family == "vit"
    # the default recipe freezes the stem with the encoder for both
    default = create_downstream_model(name, num_outputs=1, freeze_encoder=True)
    assert not ({n for n, p in default.named_parameters() if p.requires_grad} & (stem | encoder))


def test_fp16_is_refused_on_cpu_and_with_zero():
    from phileo.train.precision import resolve_precision

    with pytest.raises(ConfigError, match="needs a CUDA GPU.*train.precision=fp32"):
        resolve_precision("fp16", "cpu")
    assert resolve_precision("fp16", "cuda:0") == "fp16"
    with pytest.raises(ConfigError, match="ddp"):
        build_config(PretrainConfig, overrides=["train.precision=fp16", "train.strategy=zero2"])


def test_the_gradient_scaler_path_on_cpu(tmp_path):
    """DDPStrategy with a GradScaler (CPU's own; the fp16 run uses CUDA's, same class): a normal step equals
    the unscaled step, an overflow skips the update, lowers the scale and moves the schedule on; the scaler's
    state goes into optimizer.pt and comes back."""
    from phileo.train.dist import DistInfo
    from phileo.train.strategy import DDPStrategy

    info = DistInfo(0, 1, 0, 1, 0, 1, "cpu", "single")
    cfg = build_config(FinetuneConfig, overrides={"model.name": "phileo_cnn_tiny", "train.steps": 10,
                                                  "optim.warmup_steps": 5}, recipe="published")

    def strategy(scaler):
        torch.manual_seed(0)
        return DDPStrategy(nn.Linear(4, 1), info, cfg.train, cfg.optim, scaler)

    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    plain, scaled = strategy(None), strategy(torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    for s in (plain, scaled):
        s.backward(s.model(x).pow(2).mean(), True)
    n_plain, n_scaled = plain.optimizer_step(), scaled.optimizer_step()
    assert n_scaled == pytest.approx(n_plain, rel=1e-5)  # the norm of the unscaled gradients
    for a, b in zip(plain.model.parameters(), scaled.model.parameters()):
        assert torch.allclose(a, b, atol=1e-7)
    before = [p.detach().clone() for p in scaled.model.parameters()]
    lr_before = scaled.lr
    scaled.backward(scaled.model(x).sum() * float("inf"), True)
    assert scaled.optimizer_step() is None and scaled.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, scaled.model.parameters()))
    assert scaled.scaler.get_scale() == 2.0 ** 9 and scaled.lr != lr_before  # scale halved, schedule moved on
    ckpt = tmp_path
    scaled.save(ckpt, {})
    again = strategy(torch.amp.GradScaler("cpu"))
    again.load(ckpt)
    assert again.scaler.get_scale() == 2.0 ** 9


def test_finetuning_under_the_published_recipe_on_cpu_is_refused_with_the_fix(tmp_path, capsys):
    from phileo.bench.finetune import main
    from phileo.bench.synthetic import make_bench_data

    data = tmp_path / "bench"
    make_bench_data(data, regions=("europe",), patches_per_file=4, val_patches_per_file=2, patch_size=32)
    args = ["--recipe", "published", f"data.root={data}", "data.task=building", "data.n_shot=4",
            "model.name=phileo_cnn_tiny", "model.overrides={img_size: 32}", "data.num_workers=0",
            "train.device=cpu", f"run.dir={tmp_path / 'run'}", "run.tensorboard=false"]
    assert main(args) == 2
    assert "train.precision=fp16" in capsys.readouterr().err
    # and with the fix it names, the rest of the published recipe runs on CPU
    assert main(args + ["train.precision=fp32", "finetune.max_epochs=2"]) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["config"]["recipe"] == "published" and result["config"]["optim"]["warmup"] == "geometric"
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["grad_clip_norm"] == 0.0


# ------------------------------------------------------------------------------- launchers and sweep files
def test_launchers_and_sweep_files_take_the_recipe(tmp_path):
    from phileo.bench.sweep import build_task_config, expand_sweep
    from phileo.launch import finetune as launch_ft
    from phileo.launch import pretrain as launch_pt

    args = launch_pt.build_parser().parse_args(["--recipe", "published", "--model", "phileo_vit_100m",
                                                "--batch-size", "8", "--data", str(tmp_path), "optim.lr=1e-5"])
    cfg = launch_pt.build_config(args, tmp_path / "run", num_workers=3, base_file=None)
    assert cfg.recipe == "published" and cfg.optim.lr_scaling == "sqrt" and cfg.train.grad_clip_norm == 0
    assert (cfg.data.batch_size, cfg.optim.lr, cfg.data.num_workers) == (8, 1e-5, 3)  # flag, override, site

    args = launch_ft.build_finetune_parser().parse_args(["--recipe", "published", "--model", "phileo_vit_100m",
                                                         "--lr", "1e-4"])
    cfg = launch_ft.build_finetune_config(args, tmp_path / "ft")
    assert (cfg.recipe, cfg.train.precision, cfg.model.freeze_stem, cfg.optim.lr) == ("published", "fp16", False, 1e-4)

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("recipe: published\nbase: {data.root: /data, finetune.max_epochs: 7}\n"
                     "models: [phileo_vit_100m, phileo_cnn_44m]\ntasks: [lc]\nn_shots: [50]\nlrs: [1.0e-3]\n"
                     "seeds: [0]\n")
    vit, cnn = (build_task_config(spec, tmp_path / str(spec.index)) for spec in expand_sweep(sweep))
    assert vit.recipe == cnn.recipe == "published" and vit.optim.warmup == "geometric"
    assert (vit.model.freeze_stem, cnn.model.freeze_stem, vit.finetune.max_epochs) == (False, True, 7)
