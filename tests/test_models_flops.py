"""flops_per_sample(): the engine divides by it for MFU, so it is checked against an independent count and against
the published figures (FLOPs = 2 per multiply-accumulate of convolutions, matrix products and attention)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from phileo.models import count_forward_flops, create_downstream_model, create_model

torch.set_num_threads(1)


def analytic_flops(model: nn.Module) -> int:
    """2·MACs of every Conv2d / ConvTranspose2d / Linear from the shapes seen by forward hooks, plus the two
    attention products (QKᵀ and AV: 2·N²·D each) of every transformer block."""
    total = 0
    hooks = []

    def conv_hook(m, inp, out):
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1]
        if isinstance(m, nn.ConvTranspose2d):  # every input pixel meets every kernel tap of every filter
            total += 2 * inp[0][0].numel() * m.out_channels * k // m.groups
        else:
            total += 2 * out[0].numel() * (m.in_channels // m.groups) * k

    def linear_hook(m, inp, out):
        nonlocal total
        total += 2 * (inp[0].numel() // inp[0].shape[-1] // inp[0].shape[0]) * m.in_features * m.out_features

    def attn_hook(m, inp, out):
        nonlocal total
        n, d = inp[0].shape[1], inp[0].shape[2]
        total += 2 * 2 * n * n * d

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
        elif type(m).__name__ == "Attention":
            hooks.append(m.register_forward_hook(attn_hook))
    with torch.no_grad():
        model.eval()(torch.zeros(1, *model.input_shape, device=next(model.parameters()).device))
    for h in hooks:
        h.remove()
    return total


@pytest.mark.parametrize("build", [
    lambda: create_model("phileo_cnn_tiny"), lambda: create_model("phileo_vit_tiny"),
    lambda: create_downstream_model("phileo_cnn_tiny", 1), lambda: create_downstream_model("phileo_vit_tiny", 11),
], ids=["cnn", "vit", "cnn_downstream", "vit_upernet"])
def test_flops_per_sample_equals_an_independent_count(build):
    with torch.device("meta"):
        model = build()
    assert model.flops_per_sample() == analytic_flops(model)


def test_flops_scale_with_batch_and_are_per_sample():
    with torch.device("meta"):
        model = create_model("phileo_cnn_tiny")
    assert count_forward_flops(model, model.input_shape, batch_size=3) == 3 * model.flops_per_sample()


# Published forward GFLOPs per 128×128 sample (shared/reference/ARCHITECTURE.md). The ViT-UPerNet figure is
# reproduced to 1 %; the U-Net figures are 6 % (200M) and 15 % (44M) above ours: our count covers all
# convolutions and matmuls, the remainder does not scale like any of them (see README.md, "Models"), so the
# tolerance documents the gap rather than hides a convention change (which would be a factor ~2).
PUBLISHED_GFLOPS = [
    (lambda: create_downstream_model("phileo_vit_100m", 11), 388.5, 0.02),
    (lambda: create_model("phileo_cnn_200m"), 82.2, 0.08),
    (lambda: create_model("phileo_cnn_44m"), 5.87, 0.18),
]


@pytest.mark.parametrize("build,published,rel_tol", PUBLISHED_GFLOPS, ids=["vit_upernet_100m", "cnn_200m", "cnn_44m"])
def test_flops_match_the_published_figures(build, published, rel_tol):
    with torch.device("meta"):
        gflops = build().flops_per_sample() / 1e9
    assert abs(gflops - published) / published < rel_tol, gflops
