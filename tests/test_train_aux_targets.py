"""The auxiliary heads train when the shards carry building / land-cover targets (and stay frozen without them);
each term is weighted by its own per-sample weight."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from phileo.config import apply_overrides
from phileo.train import checkpoint as ckpt_io
from phileo.train.config import PretrainConfig
from phileo.train.loss import FoundationLoss
from phileo.train.metrics import read_metrics

torch.set_num_threads(1)
STEPS = 4


def _outputs(b: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"reconstruction": torch.rand(2 * b, 10, 8, 8, generator=g), "embedding": torch.randn(2 * b, 8, generator=g),
            "coords": torch.rand(2 * b, 4, generator=g), "clouds": torch.randn(2 * b, 4, generator=g),
            "buildings": torch.rand(2 * b, 1, generator=g), "landcover": torch.randn(2 * b, 11, generator=g)}


def test_each_auxiliary_term_uses_its_own_weight():
    b = 3
    targets = {"images": torch.rand(2 * b, 10, 8, 8), "coords": torch.rand(b, 4),
               "cloud_fraction": torch.full((b, 4), 0.25), "buildings": torch.rand(b),
               "landcover": torch.softmax(torch.randn(b, 11), -1)}
    ones, zeros = torch.ones(b), torch.zeros(b)
    _, t = FoundationLoss()(_outputs(b), {**targets, "buildings_weight": zeros, "landcover_weight": ones})
    assert t["buildings"].item() == 0 and t["landcover"].item() > 0
    _, t = FoundationLoss()(_outputs(b), {**targets, "buildings_weight": ones, "landcover_weight": zeros})
    assert t["buildings"].item() > 0 and t["landcover"].item() == 0
    w = torch.tensor([1.0, 0.0, 0.5])
    out = _outputs(b)
    _, t = FoundationLoss()(out, {**targets, "buildings_weight": w, "landcover_weight": ones})
    sq = (out["buildings"].reshape(-1) - targets["buildings"].repeat(2)) ** 2  # both views of each sample
    assert t["buildings"].item() == pytest.approx((sq * w.repeat(2)).mean().item(), rel=1e-6)

def _run(tmp_path: Path, shards: Path):
    from phileo.train.pretrain import run_pretraining

    cfg = apply_overrides(PretrainConfig(), [
        "model.name=phileo_cnn_tiny", "model.overrides={img_size: 64}", "data.patch_size=64", f"data.root={shards}",
        "data.batch_size=4", "data.num_workers=0", f"train.steps={STEPS}", "train.precision=fp32",
        "train.device=cpu", "optim.lr=1e-2", "optim.warmup_steps=0", "run.log_every_steps=1",
        "run.image_every_steps=0", "checkpoint.every_steps=100", f"run.dir={tmp_path / 'run'}"])
    result = run_pretraining(cfg)
    assert result.status == "completed" and result.step == STEPS
    torch.manual_seed(cfg.train.seed)  # the engine seeds like this before building: the initial weights
    from phileo.models import create_model

    initial = create_model("phileo_cnn_tiny", img_size=64).state_dict()
    trained = ckpt_io.load_model_state(ckpt_io.latest_checkpoint(cfg.run.dir))
    changed = {k for k in initial if k.startswith("encoder.head_") and not torch.equal(initial[k], trained[k])}
    return read_metrics(cfg.run.dir), changed


@pytest.mark.parametrize("aux", [True, False], ids=["with-rasters", "without"])
def test_heads_train_only_when_the_targets_are_present(tmp_path, aux):
    from phileo.data.synthetic import make_pretrain_shards

    shards = make_pretrain_shards(tmp_path / "data", n_cells=2, nodes=1, aux=aux)
    metrics, changed = _run(tmp_path, shards)
    heads = {k.split(".")[1] for k in changed}
    tags = set(metrics[STEPS])
    if aux:
        assert {"head_buildings", "head_landcover"} <= heads
        assert {"loss/buildings", "loss/landcover"} <= tags and metrics[1]["loss/landcover"] > 0
    else:
        assert not heads & {"head_buildings", "head_landcover"}
        assert not tags & {"loss/buildings", "loss/landcover"}
    assert "head_coords" in heads  # the always-present terms train either way
