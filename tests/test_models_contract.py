"""The published checkpoint layout is a public contract (as timm treats its state dicts).

For each reference `*.state_dict.json` (copied into tests/data so the contract travels with the repo; the copies
are checked against shared/reference when that folder is present), the registered model of that configuration
must have exactly those parameter names and shapes and that parameter total, and a published-format checkpoint
must round-trip with strict=True.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from phileo.models import (
    CheckpointMismatchError,
    create_model,
    get_model_config,
    list_models,
    load_pretrained,
    load_state_dict_checked,
)

DATA = Path(__file__).resolve().parent / "data"
PUBLISHED = ["phileo_cnn_44m", "phileo_cnn_200m", "phileo_vit_100m"]


def shared_reference_dir() -> Path | None:
    """shared/reference beside the repo (CI layout <somewhere>/main + <somewhere>/shared), or $PHILEO_SHARED."""
    candidates = [Path(__file__).resolve().parents[2] / "shared" / "reference"]
    if os.environ.get("PHILEO_SHARED"):
        env = Path(os.environ["PHILEO_SHARED"])
        candidates += [env / "reference", env]
    return next((c for c in candidates if (c / "phileo_cnn_44m.state_dict.json").is_file()), None)


def reference(name: str) -> dict:
    return json.loads((DATA / f"{name}.state_dict.json").read_text())


def meta_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


# The contract tests below read the copies in tests/data; this one checks the copies against the originals in
# the project's shared/reference when a checkout has it beside it (CI does; a lone clone does not).
@pytest.mark.skipif(shared_reference_dir() is None,
                    reason="shared/reference not present beside the repo and PHILEO_SHARED not set")
def test_contract_copies_match_shared_reference():
    ref_dir = shared_reference_dir()
    for name in PUBLISHED:
        assert (DATA / f"{name}.state_dict.json").read_bytes() == (ref_dir / f"{name}.state_dict.json").read_bytes()


@pytest.mark.parametrize("name", PUBLISHED)
def test_registered_preset_has_exactly_the_published_names_shapes_and_count(name):
    ref = reference(name)
    with torch.device("meta"):
        model = create_model(name)
    shapes = meta_shapes(model)
    assert sorted(set(ref["state_dict"]) - set(shapes)) == []  # missing
    assert sorted(set(shapes) - set(ref["state_dict"])) == []  # unexpected
    assert {k: v for k, v in shapes.items() if v != ref["state_dict"][k]} == {}
    assert model.num_params() == ref["parameters"]


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_config_dict_builds_the_same_model(name):
    """create_model(name, **published_config) accepts the published config names (incl. `chw`, `activation`)."""
    ref = reference(name)
    with torch.device("meta"):
        model = create_model(name, **ref["config"])
    assert meta_shapes(model) == ref["state_dict"]
    assert model.config == get_model_config(name)


@pytest.mark.parametrize("name", ["phileo_cnn_200m", "phileo_vit_100m"])
def test_published_layout_loads_strictly_into_large_models_on_meta(name):
    ref = reference(name)
    state_dict = {k: torch.empty(v, device="meta") for k, v in ref["state_dict"].items()}
    with torch.device("meta"):
        model = create_model(name)
    report = load_state_dict_checked(model, state_dict, strict=True)
    assert report.ok and len(report.loaded) == len(ref["state_dict"])
    # ...and the same layout is refused by a model of another size, with the missing/mismatched keys named.
    with torch.device("meta"), pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        load_state_dict_checked(create_model("phileo_cnn_44m" if "cnn" in name else "phileo_vit_300m"), state_dict)


def test_published_44m_checkpoint_round_trips_strictly(tmp_path):
    """A file in the published format ({"model": state_dict} with exactly the reference names and shapes, random
    values) loads strictly into create_model("phileo_cnn_44m"), every tensor arriving unchanged."""
    ref = reference("phileo_cnn_44m")
    gen = torch.Generator().manual_seed(0)
    published = {k: torch.randn(v, generator=gen) for k, v in ref["state_dict"].items()}
    path = tmp_path / "PhilEO_44M.pt"
    torch.save({"model": published, "epoch": 3, "best_score": -0.1, "loss_min": 0.1}, path)

    model = create_model("phileo_cnn_44m")
    report = load_pretrained(model, path, strict=True)
    assert report.format == "published" and report.ok and len(report.loaded) == len(published)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in published.items())
    # Saving the model gives back the published layout, loadable by a plain strict load_state_dict.
    fresh = create_model("phileo_cnn_44m")
    fresh.load_state_dict({"model": model.state_dict()}["model"], strict=True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in published.items())


def test_registry_has_the_contract_names():
    assert {"phileo_cnn_tiny", "phileo_cnn_44m", "phileo_cnn_200m", "phileo_vit_tiny", "phileo_vit_100m",
            "phileo_vit_300m"} <= set(list_models())


def test_tiny_presets_are_a_few_million_parameters():
    for name in ("phileo_cnn_tiny", "phileo_vit_tiny"):
        with torch.device("meta"):
            n = create_model(name).num_params()
        assert 0.5e6 < n < 10e6, (name, n)


def test_vit_300m_is_a_300m_encoder():
    """The 300M preset: ViT-L geometry at patch 4; its encoder (stem + ViT, what ViT-UPerNet fine-tunes) is the
    ~300M part, as the 100M name refers to the ~102M encoder of phileo_vit_100m."""
    with torch.device("meta"):
        big, small = create_model("phileo_vit_300m"), create_model("phileo_vit_100m")

    def encoder_params(m):
        return sum(p.numel() for p in list(m.stem.parameters()) + list(m.encoder.vit_encoder.parameters()))

    assert 290e6 < encoder_params(big) < 320e6
    assert 95e6 < encoder_params(small) < 110e6


def test_overrides_are_checked():
    with pytest.raises(ValueError, match="unknown config key"):
        create_model("phileo_cnn_44m", depth=[1, 2])
    with pytest.raises(ValueError, match="unknown model"):
        create_model("phileo_cnn_45m")
    with pytest.raises(ValueError, match="same, non-zero length"):
        create_model("phileo_cnn_44m", depths=[3, 3, 4], dims=[32, 32, 64, 64, 128])
    with pytest.raises(ValueError, match="divisible"):
        create_model("phileo_vit_100m", num_heads=7)
    with pytest.raises(ValueError, match="contradicts"):
        create_model("phileo_vit_100m", chw=[10, 128, 128], img_size=64)
    with torch.device("meta"):
        m = create_model("phileo_cnn_44m", depths=[2, 2, 2, 2, 2], latent_dim=256)
    assert m.config.depths == (2, 2, 2, 2, 2) and m.encoder.linear_encode[1].out_features == 256
