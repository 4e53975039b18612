"""Building blocks shared by the PhilEO models, with the parameter names of the published checkpoints.

Every class here keeps the attribute names of the reference implementation (`x_skipscale`, `squeeze.excitation.0`,
`norm1`, `attn.qkv`, ...) because the published state dicts are loaded by name; the maths is the reference maths,
only the way it runs differs (channels_last tolerant norms, fused attention, optional activation checkpointing).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

ACTIVATIONS = {"GELU": nn.GELU, "LeakyReLU": nn.LeakyReLU, "ReLU": nn.ReLU, "SiLU": nn.SiLU}


def make_activation(name: str) -> nn.Module:
    """Builds an activation by its torch class name ("GELU", "LeakyReLU", "ReLU", "SiLU"), with torch defaults
    (exact GELU, LeakyReLU slope 0.01) as in the reference code; refuses other names."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; use one of {sorted(ACTIVATIONS)}") from None


class ChwLayerNorm(nn.LayerNorm):
    """LayerNorm over (C, H, W) of an NCHW tensor: the published `norm1`/`norm2`/`latent_norm`/... layers.

    Same parameters (`weight`, `bias` of shape (C, H, W)) and the same function as `nn.LayerNorm([C, H, W])`.
    `nn.LayerNorm` needs the last three dims contiguous, so a channels_last input would be copied to NCHW and back
    on every call; the statistics are a per-sample reduction over all elements and the affine part is a broadcast,
    so for channels_last inputs we compute it layout-agnostically instead (fused by torch.compile).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_contiguous():
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        # Statistics in at least float32 (also under bf16 autocast, like F.layer_norm).
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        var, mean = torch.var_mean(xf, dim=(1, 2, 3), keepdim=True, correction=0)
        y = (xf - mean) * torch.rsqrt(var + self.eps) * self.weight.to(xf.dtype) + self.bias.to(xf.dtype)
        # Under autocast F.layer_norm returns float32; outside it, the input dtype. Do the same.
        return y if _autocast_enabled(x.device.type) else y.to(x.dtype)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


class ScaleSkip2D(nn.Module):
    """Learnable channel-wise scale and bias on both branches of a skip connection.

    forward(x, y) = (x * x_skipscale + x_skipbias) + (y * y_skipscale + y_skipbias), all four of shape (1, C, 1, 1).
    The reference's optional Gaussian channel dropout on `y` is not implemented: the published models never enable
    it (decoder `dropout=None`), and it has no parameters, so checkpoints are unaffected.
    """

    def __init__(self, channels: int, init_std: float = 0.01):
        super().__init__()
        self.channels = channels
        # Declared in the reference order (state dict order is cosmetic, names are what must match).
        self.x_skipscale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.y_skipscale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.y_skipbias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.x_skipbias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The reference draws scales ~ N(1, 0.01) and biases ~ N(0, 0.01), truncated; exact zeros are redrawn by it,
        # which has probability zero in float32 and is not worth a loop.
        if self.x_skipscale.is_meta:
            return
        with torch.no_grad():
            nn.init.trunc_normal_(self.x_skipscale, 1.0, self.init_std)
            nn.init.trunc_normal_(self.y_skipscale, 1.0, self.init_std)
            nn.init.trunc_normal_(self.y_skipbias, 0.0, self.init_std)
            nn.init.trunc_normal_(self.x_skipbias, 0.0, self.init_std)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x * self.x_skipscale + self.x_skipbias) + (y * self.y_skipscale + self.y_skipbias)


class SEBlock(nn.Module):
    """Squeeze-and-excitation (reduction 16): global mean → Linear → GELU → Linear → Sigmoid → channel gate.

    Parameter names `excitation.0.weight`, `excitation.2.weight` as published (the GELU and Sigmoid sit at 1 and 3).
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.excitation = nn.Sequential(
            nn.Linear(channels, hidden, bias=False),
            nn.GELU(),
            nn.Linear(hidden, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # mean over H, W works for any memory format (AdaptiveAvgPool2d(1) + view in the reference).
        gate = self.excitation(x.mean(dim=(2, 3)))
        return x * gate[:, :, None, None]


class ReplicateConv2d(nn.Conv2d):
    """Conv2d with replicate padding, the same maths and parameters as `nn.Conv2d(..., padding=k // 2,
    padding_mode="replicate")`.

    Under torch.compile the padding is written as edge concatenation instead of aten.replication_pad2d, whose
    backward trips an inductor stride assertion in torch 2.13 (seen on CPU: "expected size 10==10, stride 1==16384
    ... replication_pad2d_backward"); eager mode keeps the single fused padding kernel.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, padding=0, bias=bias)
        self.replicate = kernel_size // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.replicate
        if p:
            if torch.compiler.is_compiling():
                x = torch.cat([x[:, :, :1].expand(-1, -1, p, -1), x, x[:, :, -1:].expand(-1, -1, p, -1)], dim=2)
                x = torch.cat([x[..., :1].expand(-1, -1, -1, p), x, x[..., -1:].expand(-1, -1, -1, p)], dim=3)
            else:
                x = F.pad(x, (p, p, p, p), mode="replicate")
        return F.conv2d(x, self.weight, self.bias)


class CNNBlock(nn.Module):
    """The PhilEO residual CNN block, tied to one spatial size by its (C, H, W) LayerNorms.

    identity = matcher(x) (1×1 conv, only when c_in != c_out) else x;
    x → conv1 1×1 → norm1 → act → conv2 3×3 (replicate padding) → norm2 → act → conv3 1×1 (+bias)
      → squeeze (SE) → scaler(x, identity) → activation_out.

    Takes channels_in, channels_out, the spatial size (height, width), the activation module and an optional
    different output activation (the reconstruction heads use Sigmoid; downstream heads use Identity).
    """

    def __init__(
        self,
        channels_in: int,
        channels_out: int,
        hw: Sequence[int],
        activation: nn.Module,
        activation_out: nn.Module | None = None,
    ):
        super().__init__()
        h, w = int(hw[0]), int(hw[1])
        self.channels_in, self.channels_out = channels_in, channels_out
        self.activation = activation
        self.activation_out = activation if activation_out is None else activation_out
        self.squeeze = SEBlock(channels_out, 16)
        self.matcher = nn.Conv2d(channels_in, channels_out, 1, bias=False) if channels_in != channels_out else None
        self.norm1 = ChwLayerNorm([channels_out, h, w])
        self.norm2 = ChwLayerNorm([channels_out, h, w])
        self.conv1 = nn.Conv2d(channels_in, channels_out, 1, bias=False)
        self.conv2 = ReplicateConv2d(channels_out, channels_out, 3, bias=False)
        self.conv3 = nn.Conv2d(channels_out, channels_out, 1, bias=True)
        self.scaler = ScaleSkip2D(channels_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.matcher is None else self.matcher(x)
        x = self.activation(self.norm1(self.conv1(x)))
        x = self.activation(self.norm2(self.conv2(x)))
        x = self.squeeze(self.conv3(x))
        return self.activation_out(self.scaler(x, identity))


# --------------------------------------------------------------------------------------------------------------
# Transformer parts. timm cannot be installed in our CPU environment (it pulls torchvision, whose wheels want a
# different torch build), so the timm `Block` is restated here with timm's parameter names (norm1, attn.qkv,
# attn.proj, norm2, mlp.fc1, mlp.fc2) and timm's maths (pre-norm, qkv with bias, exact GELU, no layer scale, no drop
# path), using F.scaled_dot_product_attention so CUDA picks the flash / memory-efficient kernels.
# --------------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention as timm's `Attention` (qkv_bias=True), computed with scaled_dot_product_attention."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}; pick a divisor of {dim}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim), as timm
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """fc1 → GELU → fc2, timm's names."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block, timm `Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm)`."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)  # eps 1e-5: the reference passes plain nn.LayerNorm, not timm's 1e-6
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, checkpointing: bool, keep: Sequence[int] = ()
               ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Runs `blocks` in order, with non-reentrant activation checkpointing per block when asked and training.

    Returns the output and the hidden states at the indices in `keep` (before any final norm).
    """
    kept: dict[int, torch.Tensor] = {}
    use_ckpt = checkpointing and torch.is_grad_enabled()
    for i, blk in enumerate(blocks):
        if use_ckpt:
            x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
        else:
            x = blk(x)
        if i in keep:
            kept[i] = x
    return x, kept


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """MAE's fixed 2-D sine-cosine position table, (1 + grid_size², embed_dim) with a zero CLS row, float32.

    As in MAE (`get_2d_sincos_pos_embed`): the first half of the channels encodes the column index, the second half
    the row index (MAE's meshgrid puts w first), each half being [sin(p·ω), cos(p·ω)] with
    ω_i = 1 / 10000^(i / (D/4)); computed in float64 and rounded once to float32, like the numpy original.
    Refuses an embed_dim not divisible by 4.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None, :]
        return torch.cat([out.sin(), out.cos()], dim=1)

    table = torch.cat([encode(cols), encode(rows)], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), table], dim=0)
    return table.float().unsqueeze(0)


def xavier_init_linear_and_norm(module: nn.Module) -> None:
    """MAE/JAX-ViT initialisation: xavier_uniform Linear weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and not isinstance(module, ChwLayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def conv_out_hw(img_size: int, factor: int) -> int:
    """img_size / factor, refusing sizes that do not divide (the (C, H, W) norms need exact sizes)."""
    if img_size % factor:
        raise ValueError(f"img_size {img_size} is not divisible by {factor}; the model needs it to be")
    return img_size // factor


__all__ = [
    "ACTIVATIONS", "make_activation", "ChwLayerNorm", "ScaleSkip2D", "SEBlock", "ReplicateConv2d", "CNNBlock",
    "Attention", "Mlp",
    "TransformerBlock", "run_blocks", "sincos_pos_embed_2d", "xavier_init_linear_and_norm", "conv_out_hw",
]
