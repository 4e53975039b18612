"""Forward/backward behaviour of every registered model: output contract, gradients, speed features.

Large presets run forward+backward on the meta device (shapes, autograd graph and gradient coverage without the
compute); the tiny presets and the 44M U-Net run for real on CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from phileo.models import PRETRAINING_OUTPUTS, create_downstream_model, create_model, list_models

torch.set_num_threads(1)
TINY = ["phileo_cnn_tiny", "phileo_vit_tiny"]


def reflectance(batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Real-range inputs (reflectance / 10000): land 0..0.6, bright cloud pixels up to 1.6, one no-data sample."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 10, 128, 128, generator=gen) * 0.6
    x[0, :, 40:70, 40:70] = 1.6
    x[-1] = 0.0
    return x


def expected_shapes(model, batch: int) -> dict[str, tuple[int, ...]]:
    c = model.config
    return {"reconstruction": (batch, c.input_dim, c.img_size, c.img_size), "embedding": (batch, c.latent_dim),
            "coords": (batch, 4), "clouds": (batch, 4), "buildings": (batch, 1), "landcover": (batch, 11)}


def every_output_loss(out) -> torch.Tensor:
    if isinstance(out, dict):
        return sum(v.float().square().mean() for v in out.values())
    return out.float().square().mean()


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_runs_forward_backward_with_full_gradient_coverage(name):
    """On meta: the output contract holds and every trainable parameter gets a gradient (DDP with
    find_unused_parameters=False needs that), for the pretraining model and both fine-tuning heads."""
    with torch.device("meta"):
        models = [create_model(name), create_downstream_model(name, 1), create_downstream_model(name, 11)]
        x = torch.empty(2, 10, 128, 128)
    for model in models:
        out = model.train()(x)
        if isinstance(out, dict):
            assert tuple(out) == PRETRAINING_OUTPUTS
            assert {k: tuple(v.shape) for k, v in out.items()} == expected_shapes(model, 2)
        else:
            assert tuple(out.shape) == (2, model.num_outputs, 128, 128)
        every_output_loss(out).backward()
        no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert no_grad == [], f"{name}/{type(model).__name__}: parameters without gradient: {no_grad[:5]}"


@pytest.mark.parametrize("name", TINY + ["phileo_cnn_44m"])
def test_real_forward_backward_is_finite_and_in_range(name):
    torch.manual_seed(0)
    model = create_model(name).train()
    x = reflectance()
    out = model(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == expected_shapes(model, 2)
    assert all(torch.isfinite(v).all() for v in out.values())
    for key in ("reconstruction", "coords", "buildings"):  # sigmoid outputs
        assert 0.0 <= out[key].min() and out[key].max() <= 1.0, key
    assert not torch.allclose(out["embedding"][0], out["embedding"][1])  # the two samples are told apart
    every_output_loss(out).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.slow
def test_real_forward_backward_200m():
    model = create_model("phileo_cnn_200m")
    out = model(reflectance(batch=1))
    assert all(torch.isfinite(v).all() for v in out.values())
    every_output_loss(out).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("num_outputs", [1, 11])
def test_downstream_forward_backward(name, num_outputs):
    model = create_downstream_model(name, num_outputs).train()
    y = model(reflectance())
    assert y.shape == (2, num_outputs, 128, 128) and torch.isfinite(y).all()
    every_output_loss(y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", TINY)
def test_frozen_encoder_gets_no_gradient_and_no_update(name):
    model = create_downstream_model(name, 1, freeze_encoder=True).train()
    encoder, decoder = list(model.encoder_parameters()), list(model.decoder_parameters())
    assert {id(p) for p in encoder}.isdisjoint(id(p) for p in decoder)
    assert len(encoder) + len(decoder) == len(list(model.parameters()))
    assert not any(p.requires_grad for p in encoder) and all(p.requires_grad for p in decoder)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    every_output_loss(model(reflectance())).backward()
    assert all(p.grad is None for p in encoder) and all(p.grad is not None for p in decoder)
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and not any(n.startswith(("stem.", "encoder.")) for n in changed)
    model.set_encoder_frozen(False)
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.endswith("pos_embed"))


EQUIVALENCE_MODELS = {
    "cnn": lambda: create_model("phileo_cnn_tiny"),
    "vit": lambda: create_model("phileo_vit_tiny"),
    "cnn_downstream": lambda: create_downstream_model("phileo_cnn_tiny", 11),
    "vit_upernet": lambda: create_downstream_model("phileo_vit_tiny", 11),
}


def _outputs(out):
    return list(out.values()) if isinstance(out, dict) else [out]


@pytest.mark.parametrize("build", list(EQUIVALENCE_MODELS.values()), ids=list(EQUIVALENCE_MODELS))
def test_channels_last_gives_the_same_outputs(build):
    torch.manual_seed(0)
    model = build().eval()
    x = reflectance()
    with torch.no_grad():
        ref = _outputs(model(x))
        model = model.to(memory_format=torch.channels_last)
        got = _outputs(model(x.contiguous(memory_format=torch.channels_last)))
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("build", list(EQUIVALENCE_MODELS.values()), ids=list(EQUIVALENCE_MODELS))
def test_bf16_autocast_is_finite_and_close_to_fp32(build):
    torch.manual_seed(0)
    model = build().eval()
    x = reflectance()
    with torch.no_grad():
        ref = _outputs(model(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = _outputs(model(x))
    for a, b in zip(ref, got):
        assert torch.isfinite(b).all()
        # bf16 keeps ~3 significant digits; the outputs must stay the same function to within that.
        err = (b.float() - a).norm() / a.norm().clamp_min(1e-6)
        assert err < 0.05, float(err)


@pytest.mark.parametrize("build", list(EQUIVALENCE_MODELS.values()), ids=list(EQUIVALENCE_MODELS))
def test_grad_checkpointing_changes_memory_not_results(build):
    torch.manual_seed(0)
    model = build().train()
    for m in model.modules():  # dropout off: both passes must see the same function
        if isinstance(m, nn.Dropout2d):
            m.p = 0.0
    x = reflectance()
    every_output_loss(model(x)).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    assert model.config.grad_checkpointing
    every_output_loss(model(x)).backward()
    for n, p in model.named_parameters():
        if n in ref:
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6)


def test_grad_checkpointing_is_a_constructor_flag():
    assert create_model("phileo_vit_tiny", grad_checkpointing=True).config.grad_checkpointing
    assert create_downstream_model("phileo_cnn_tiny", 1, grad_checkpointing=True).config.grad_checkpointing
    assert not create_model("phileo_cnn_tiny").config.grad_checkpointing


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY)
def test_torch_compile_traces_whole_graph(name):
    """fullgraph=True fails on any graph break; aot_eager exercises the AOT-autograd path without paying for
    C++ code generation (benchmarks/models.py runs the inductor backend)."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = reflectance()
    with torch.no_grad():
        ref = model(x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    every_output_loss(out).backward()
    for k in ref:
        torch.testing.assert_close(out[k].detach(), ref[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_inductor_compiles_cnn_block_forward_backward():
    """The inductor backend (not only tracing): a CNNBlock's replicate padding used to fail in the compiled
    backward (aten.replication_pad2d_backward stride assertion, torch 2.13); gradients must match eager."""
    from phileo.models.blocks import CNNBlock

    torch.manual_seed(0)
    block = CNNBlock(3, 4, (16, 16), nn.GELU())
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True)
    compiled(x).square().mean().backward()
    grad_compiled = x.grad.clone()
    x.grad = None
    block(x).square().mean().backward()
    torch.testing.assert_close(grad_compiled, x.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY)
def test_compile_blocks_keeps_parameter_names_and_function(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    names = list(model.state_dict())
    x = reflectance()
    with torch.no_grad():
        ref = model(x)
        model.compile_blocks(backend="aot_eager", fullgraph=True)
        out = model(x)
    assert list(model.state_dict()) == names  # checkpoints stay in the published layout
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-5)
