""""Computes the same function": the models against a direct functional re-statement of ARCHITECTURE.md.

The oracles below use only the state dict and torch.nn.functional, written from the architecture description
(shared/reference/ARCHITECTURE.md), not from our modules. Models run in float64 with every parameter perturbed
away from its initial value (so that, e.g., swapped x/y skip scales or a missing LayerNorm affine would show).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from phileo.models import create_downstream_model, create_model, load_pretrained, save_published
from phileo.models.blocks import sincos_pos_embed_2d

torch.set_num_threads(1)


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    return model.double().eval()


def sample(batch: int = 2, seed: int = 1) -> torch.Tensor:
    # reflectance / 10000: mostly 0..0.6, a few bright (cloud) pixels up to 1.5
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 10, 128, 128, generator=gen, dtype=torch.float64) * 0.6
    x[:, :, :8, :8] = 1.5
    return x


# ---- functional oracles ---------------------------------------------------------------------------------------

def f_scaleskip(sd, p, x, y):
    return (x * sd[p + "x_skipscale"] + sd[p + "x_skipbias"]) + (y * sd[p + "y_skipscale"] + sd[p + "y_skipbias"])


def f_se(sd, p, x):
    s = F.adaptive_avg_pool2d(x, 1).flatten(1)
    s = F.linear(F.gelu(F.linear(s, sd[p + "excitation.0.weight"])), sd[p + "excitation.2.weight"])
    return x * torch.sigmoid(s)[:, :, None, None]


def f_ln(sd, p, x):
    w = sd[p + "weight"]
    return F.layer_norm(x, tuple(w.shape), w, sd[p + "bias"], eps=1e-5)


def f_conv3x3_replicate(x, w):
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), w)


def f_cnnblock(sd, p, x, act, act_out=None):
    identity = F.conv2d(x, sd[p + "matcher.weight"]) if p + "matcher.weight" in sd else x
    h = act(f_ln(sd, p + "norm1.", F.conv2d(x, sd[p + "conv1.weight"])))
    h = act(f_ln(sd, p + "norm2.", f_conv3x3_replicate(h, sd[p + "conv2.weight"])))
    h = f_se(sd, p + "squeeze.", F.conv2d(h, sd[p + "conv3.weight"], sd[p + "conv3.bias"]))
    return (act_out or act)(f_scaleskip(sd, p + "scaler.", h, identity))


def f_upsampler(sd, p, x, act):
    x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
    return act(f_ln(sd, p + "2.", f_conv3x3_replicate(x, sd[p + "1.weight"])))


def f_heads(sd, emb, bare_linears=False):
    def lin(name):
        p = f"encoder.{name}." if bare_linears else f"encoder.{name}.0."
        return F.linear(emb, sd[p + "weight"], sd[p + "bias"])

    def seq(name):  # always Sequential(Linear, Sigmoid)
        return torch.sigmoid(F.linear(emb, sd[f"encoder.{name}.0.weight"], sd[f"encoder.{name}.0.bias"]))

    return {"coords": seq("head_coords"), "clouds": lin("head_clouds"), "buildings": seq("head_buildings"),
            "landcover": lin("head_landcover")}


def f_unet(sd, depths, x, head_act=torch.sigmoid):
    act = F.gelu
    n = len(depths)
    x = f_cnnblock(sd, "stem.", x, act)
    skips = []
    for i in range(n):
        stage_in = x
        for j in range(depths[i]):
            x = f_cnnblock(sd, f"encoder.blocks_down.{i}.{j}.", x, act)
        if depths[i] > 1:
            x = f_scaleskip(sd, f"encoder.block_scalers.{i}.", x, stage_in)
        skips.append(x)
        if i < n - 1:
            x = F.max_pool2d(F.conv2d(x, sd[f"encoder.downsample.{i}.0.weight"],
                                      sd[f"encoder.downsample.{i}.0.bias"]), 2)
    x = f_ln(sd, "encoder.prelinear_norm.", x)
    emb = F.linear(act(x.flatten(1)), sd["encoder.linear_encode.1.weight"], sd["encoder.linear_encode.1.bias"])
    emb = f_ln(sd, "encoder.linear_encode.2.", emb)
    c, s = x.shape[1], x.shape[2]
    d = f_ln(sd, "decoder.latent_norm.",
             F.linear(emb, sd["decoder.linear_decode.weight"], sd["decoder.linear_decode.bias"]).reshape(-1, c, s, s))
    up_depths = depths[::-1]
    for i in range(n):
        d = f_scaleskip(sd, f"decoder.skip_scalers.{i}.", d, skips[n - 1 - i])
        stage_in = d
        for j in range(up_depths[i]):
            d = f_cnnblock(sd, f"decoder.blocks_up.{i}.{j}.", d, act)
        if up_depths[i] > 1:
            d = f_scaleskip(sd, f"decoder.block_scalers.{i}.", d, stage_in)
        if i < n - 1:
            d = f_upsampler(sd, f"decoder.upsamplers.{i}.", d, act)
    d = f_ln(sd, "decoder.prehead_norm.", d)
    return f_cnnblock(sd, "head.", d, act, head_act), emb


def f_transformer_block(sd, p, x, heads):
    b, n, dim = x.shape
    h = f_ln(sd, p + "norm1.", x)
    qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).reshape(b, n, 3, heads, dim // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dim // heads), dim=-1)
    x = x + F.linear((attn @ v).transpose(1, 2).reshape(b, n, dim), sd[p + "attn.proj.weight"],
                     sd[p + "attn.proj.bias"])
    h = f_ln(sd, p + "norm2.", x)
    return x + F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])


def f_vit_encoder(sd, cfg, x):
    act = lambda t: F.leaky_relu(t, 0.01)  # noqa: E731
    x = f_cnnblock(sd, "stem.", x, act)
    p = "encoder.vit_encoder."
    tok = F.conv2d(x, sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"], stride=cfg.patch_size)
    tok = tok.flatten(2).transpose(1, 2) + sd[p + "pos_embed"][:, 1:]
    cls = (sd[p + "cls_token"] + sd[p + "pos_embed"][:, :1]).expand(x.shape[0], -1, -1)
    tok = torch.cat([cls, tok], dim=1)
    hidden = []
    for i in range(cfg.depth):
        tok = f_transformer_block(sd, f"{p}blocks.{i}.", tok, cfg.num_heads)
        hidden.append(tok)
    tok = f_ln(sd, p + "norm.", tok)
    hidden[-1] = tok
    return tok, hidden, act


# ---- block-level tests ----------------------------------------------------------------------------------------

def test_sincos_table_is_maes():
    """MAE's get_2d_sincos_pos_embed, restated in NumPy: w coordinate in the first half of the channels."""
    def one_dim(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    for dim, g in ((512, 32), (64, 16)):
        grid = np.stack(np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32)), 0)
        table = np.concatenate([one_dim(dim // 2, grid[0]), one_dim(dim // 2, grid[1])], axis=1)
        table = np.concatenate([np.zeros([1, dim]), table], axis=0)[None].astype(np.float32)
        ours = sincos_pos_embed_2d(dim, g)
        assert ours.shape == (1, g * g + 1, dim)
        np.testing.assert_array_equal(ours.numpy(), table)


def test_fresh_vit_uses_the_fixed_table_and_does_not_train_it():
    model = create_model("phileo_vit_tiny")
    pos = model.encoder.vit_encoder.pos_embed
    assert not pos.requires_grad
    assert torch.equal(pos, sincos_pos_embed_2d(model.config.embed_dim, model.config.grid_size))


# ---- whole-model tests ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("depths", [(2, 2, 2, 2, 2), (1, 2, 1, 3, 1)])
def test_unet_matches_the_functional_restatement(depths):
    model = perturbed(create_model("phileo_cnn_tiny", depths=depths))
    sd = model.state_dict()
    x = sample()
    with torch.no_grad():
        out = model(x)
        rec, emb = f_unet(sd, depths, x)
    torch.testing.assert_close(out["embedding"], emb, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out["reconstruction"], rec, rtol=1e-10, atol=1e-10)
    for key, value in f_heads(sd, emb).items():
        torch.testing.assert_close(out[key], value, rtol=1e-10, atol=1e-10)


def test_vit_matches_the_functional_restatement():
    model = perturbed(create_model("phileo_vit_tiny"))
    cfg, sd = model.config, model.state_dict()
    x = sample()
    with torch.no_grad():
        out = model(x)
        tok, _, act = f_vit_encoder(sd, cfg, x)
        emb = F.linear(tok[:, 0], sd["encoder.linear_proj.weight"], sd["encoder.linear_proj.bias"])
        d = tok
        for i in range(cfg.decoder_depth):
            d = f_transformer_block(sd, f"decoder.decoder_blocks.{i}.", d, cfg.decoder_num_heads)
        d = f_ln(sd, "decoder.norm.", d)
        g = cfg.img_size // cfg.patch_size
        d = d[:, 1:].transpose(1, 2).reshape(x.shape[0], cfg.embed_dim, g, g)
        d = F.conv2d(d, sd["decoder.reconstruction_layer.weight"], sd["decoder.reconstruction_layer.bias"])
        d = F.interpolate(d, size=(128, 128), mode="bilinear", align_corners=False)
        rec = f_cnnblock(sd, "head.", d, act, torch.sigmoid)
    torch.testing.assert_close(out["embedding"], emb, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out["reconstruction"], rec, rtol=1e-10, atol=1e-10)
    for key, value in f_heads(sd, emb, bare_linears=True).items():  # clouds/landcover: bare Linears here
        torch.testing.assert_close(out[key], value, rtol=1e-10, atol=1e-10)


def _f_convbnrelu(sd, p, x, padding):
    x = F.conv2d(x, sd[p + "conv.weight"], padding=padding)
    x = F.batch_norm(x, sd[p + "bn.running_mean"], sd[p + "bn.running_var"], sd[p + "bn.weight"],
                     sd[p + "bn.bias"], training=False, eps=1e-5)
    return F.relu(x)


def test_vit_upernet_matches_the_functional_restatement():
    """Hidden states of blocks depth·k/4 − 1, CLS dropped, brought to a 4-level pyramid (2 / 1 transposed-conv
    steps, BN+ReLU, max-pool), then PPM(1,2,3,6) + FPN + fused 3×3 bottleneck, 1×1 classifier (eval mode)."""
    model = create_downstream_model("phileo_vit_tiny", num_outputs=11)
    with torch.no_grad():  # non-trivial BN running statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    model = perturbed(model)
    cfg, sd = model.config, model.state_dict()
    x = sample()
    rs = lambda t, size: F.interpolate(t, size=size, mode="bilinear", align_corners=False)  # noqa: E731
    with torch.no_grad():
        out = model(x)
        _, hidden, _ = f_vit_encoder(sd, cfg, x)
        g = cfg.img_size // cfg.patch_size
        idx = [cfg.depth * k // 4 - 1 for k in (1, 2, 3, 4)]
        maps = [hidden[i][:, 1:].transpose(1, 2).reshape(x.shape[0], cfg.embed_dim, g, g) for i in idx]

        def up(p, t, steps):
            for s in range(steps):
                t = F.conv_transpose2d(t, sd[f"{p}.{3 * s}.weight"], sd[f"{p}.{3 * s}.bias"], stride=2)
                t = F.relu(F.batch_norm(t, sd[f"{p}.{3 * s + 1}.running_mean"], sd[f"{p}.{3 * s + 1}.running_var"],
                                        sd[f"{p}.{3 * s + 1}.weight"], sd[f"{p}.{3 * s + 1}.bias"], False))
            return t

        levels = [up("neck.fpn1", maps[0], 2), up("neck.fpn2", maps[1], 1),
                  F.relu(F.batch_norm(maps[2], sd["neck.fpn3.0.running_mean"], sd["neck.fpn3.0.running_var"],
                                      sd["neck.fpn3.0.weight"], sd["neck.fpn3.0.bias"], False)),
                  F.max_pool2d(maps[3], 2)]
        top = levels[-1]
        ppm = [top] + [rs(_f_convbnrelu(sd, f"decoder.psp_modules.{i}.1.", F.adaptive_avg_pool2d(top, s), 0),
                          top.shape[2:]) for i, s in enumerate((1, 2, 3, 6))]
        laterals = [_f_convbnrelu(sd, f"decoder.lateral_convs.{i}.", levels[i], 0) for i in range(3)]
        laterals.append(_f_convbnrelu(sd, "decoder.bottleneck.", torch.cat(ppm, 1), 1))
        for i in (3, 2, 1):
            laterals[i - 1] = laterals[i - 1] + rs(laterals[i], laterals[i - 1].shape[2:])
        outs = [_f_convbnrelu(sd, f"decoder.fpn_convs.{i}.", laterals[i], 1) for i in range(3)] + [laterals[3]]
        outs = [outs[0]] + [rs(o, outs[0].shape[2:]) for o in outs[1:]]
        fused = _f_convbnrelu(sd, "decoder.fpn_bottleneck.", torch.cat(outs, 1), 1)
        logits = F.conv2d(fused, sd["decoder.conv_seg.weight"], sd["decoder.conv_seg.bias"])
        logits = rs(logits, (128, 128))
    assert out.shape == (2, 11, 128, 128)
    torch.testing.assert_close(out, logits, rtol=1e-9, atol=1e-9)


def test_cnn_downstream_is_the_unet_with_a_raw_head():
    model = perturbed(create_downstream_model("phileo_cnn_tiny", num_outputs=1))
    x = sample()
    with torch.no_grad():
        expected, _ = f_unet(model.state_dict(), model.config.depths, x, head_act=lambda t: t)
        torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["phileo_cnn_tiny", "phileo_vit_tiny"])
def test_state_dict_save_and_load_gives_identical_outputs(name, tmp_path):
    model = create_model(name).eval()
    path = save_published(model, tmp_path / "ckpt.pt", step=7)
    fresh = create_model(name).eval()
    x = sample().float()
    with torch.no_grad():
        assert not torch.equal(fresh(x)["reconstruction"], model(x)["reconstruction"])  # different init
        report = load_pretrained(fresh, path)
        a, b = model(x), fresh(x)
    assert report.step == 7 and report.ok
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_chw_layernorm_is_layout_independent():
    """The (C, H, W) LayerNorm gives the nn.LayerNorm result for NCHW and channels_last inputs alike."""
    from phileo.models.blocks import ChwLayerNorm

    norm = perturbed(ChwLayerNorm([6, 16, 16]))
    x = torch.randn(3, 6, 16, 16, dtype=torch.float64) * 3 + 1
    expected = F.layer_norm(x, (6, 16, 16), norm.weight, norm.bias, eps=1e-5)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert not cl.is_contiguous()
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm(cl), expected, rtol=1e-12, atol=1e-12)
