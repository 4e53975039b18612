"""The PhilEO foundation loss: two corrupted views of each batch, reconstruction, coordinates, cloud fractions,
optional auxiliary targets and embedding-similarity terms (../shared/reference/ARCHITECTURE.md).

Views. Each view flips every image at random (horizontally and/or vertically) and then erases one rectangle
covering 25-50 % of it, filled with uniform random values in [0, 1]; its target is the flipped, uncorrupted
image. All randomness comes from a torch.Generator the caller seeds (the engine seeds it from (seed, step,
micro-batch, rank)), so a resumed run corrupts exactly as the uninterrupted one did.

Terms (each logged as loss/<term>; the total is their weighted sum with the weights of LossConfig):
    reconstruction      MSE between each view's reconstruction and its target, averaged over both views
    coords              MSE of the 4 sin/cos coordinate values in [0, 1]
    clouds              soft cross-entropy of the 4 cloud-class logits against the cloud-class fractions
    buildings           MSE of the building fraction, each sample weighted by its `buildings_weight` (optional)
    landcover           soft cross-entropy against the 11 land-cover fractions, by `landcover_weight` (optional)
    embedding_positive  1 - cos(e1, e2) between the two views of a sample
    embedding_negative  max(0, cos(e1, e2')) with e2' the other view of *another* sample of the batch
    embedding_distance  mean Euclidean distance between e1 and e2

Differences from the reference, on purpose: the cloud target is the class fraction of the mask (the reference
divided the mask by 10000 first, so only class 0 ever counted); negatives pair each sample with the next one
(batch rolled by one) rather than the batch reversed, which for odd batch sizes made the middle sample its own
negative; per-view terms are averaged over the views rather than summed, so weights do not depend on the
number of views.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from phileo.train.config import LossConfig

TERMS = ("reconstruction", "coords", "clouds", "buildings", "landcover", "embedding_positive",
         "embedding_negative", "embedding_distance")


def random_flips(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flips each image of (B, C, H, W) horizontally and vertically, each with probability 1/2."""
    b = images.shape[0]
    flip = torch.rand((2, b), generator=generator, device=generator.device) < 0.5
    flip = flip.to(images.device)
    h = flip[0].view(b, 1, 1, 1)
    v = flip[1].view(b, 1, 1, 1)
    images = torch.where(h, images.flip(-1), images)
    return torch.where(v, images.flip(-2), images)


def random_erase(images: torch.Tensor, generator: torch.Generator,
                 fraction: tuple[float, float] = (0.25, 0.5)) -> torch.Tensor:
    """Replaces one rectangle per image of (B, C, H, W) by uniform random values in [0, 1].

    The rectangle covers a fraction of the image drawn uniformly from `fraction`, with an aspect ratio between
    1:2 and 2:1 (log-uniform) clipped to the image, at a uniform position. Returns a new tensor.
    """
    b, c, h, w = images.shape
    dev = generator.device
    area = torch.empty(b, device=dev).uniform_(fraction[0], fraction[1], generator=generator) * h * w
    log_ratio = torch.empty(b, device=dev).uniform_(-0.6931, 0.6931, generator=generator)
    ratio = torch.exp(log_ratio)
    eh = torch.sqrt(area * ratio).round().clamp(1, h).long()
    ew = (area / eh).round().clamp(1, w).long()
    top = (torch.rand(b, generator=generator, device=dev) * (h - eh + 1)).floor().long()
    left = (torch.rand(b, generator=generator, device=dev) * (w - ew + 1)).floor().long()
    rows = torch.arange(h, device=dev).view(1, h, 1)
    cols = torch.arange(w, device=dev).view(1, 1, w)
    mask = ((rows >= top.view(b, 1, 1)) & (rows < (top + eh).view(b, 1, 1))
            & (cols >= left.view(b, 1, 1)) & (cols < (left + ew).view(b, 1, 1)))
    noise = torch.rand((b, c, h, w), generator=generator, device=dev, dtype=torch.float32)
    mask = mask.to(images.device).unsqueeze(1)
    return torch.where(mask, noise.to(images.device, images.dtype), images)


def make_views(images: torch.Tensor, generator: torch.Generator, n_views: int = 2, flips: bool = True,
               erase_fraction: tuple[float, float] = (0.25, 0.5)) -> tuple[torch.Tensor, torch.Tensor]:
    """The corrupted views of a batch and their targets, stacked view-major: (n_views·B, C, H, W) each.

    Rows [v·B, (v+1)·B) hold view v. Targets are the flipped clean images, inputs the flipped and erased ones.
    """
    inputs, targets = [], []
    for _ in range(n_views):
        target = random_flips(images, generator) if flips else images
        inputs.append(random_erase(target, generator, erase_fraction))
        targets.append(target)
    return torch.cat(inputs), torch.cat(targets)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of `logits` (B, K) against a distribution `target` (B, K) (rows sum to 1)."""
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1)


def _weighted_mean(per_sample: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return per_sample.mean()
    weight = weight.to(per_sample.dtype).reshape(per_sample.shape)
    # Weighted by the fraction of valid pixels, normalised by the batch size (not by the weight sum) so that a
    # batch with little valid auxiliary data contributes little.
    return (per_sample * weight).mean()


class FoundationLoss(torch.nn.Module):
    """The foundation loss of phileo.train.loss (module docstring) on model outputs for stacked views.

    forward(outputs, targets, n_views=2) takes the model's output dict for the (n_views·B) stacked views
    (`reconstruction`, `embedding`, `coords`, `clouds` logits, and `buildings`/`landcover` when those targets are
    given) and the targets of the B original samples: `images` (n_views·B, C, H, W: the view targets),
    `coords` (B, 4), `cloud_fraction` (B, 4), optional `buildings` (B, 1), `landcover` (B, 11), their weights
    `buildings_weight`, `landcover_weight` (B,) and `aux_valid_fraction` (B,) (the weight of a target that has
    no own weight). Returns (total, {term: value}) with every value a 0-d tensor, the
    optional terms only when their targets are present. Refuses missing outputs or targets by name.
    """

    def __init__(self, cfg: LossConfig | None = None):
        super().__init__()
        self.cfg = cfg or LossConfig()

    def weight(self, term: str) -> float:
        return float(getattr(self.cfg, term))

    def forward(self, outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor],
                n_views: int = 2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        for key in ("reconstruction", "embedding", "coords", "clouds"):
            if key not in outputs:
                raise KeyError(f"the model output has no {key!r} (got {sorted(outputs)}); the foundation loss needs "
                               f"a PhilEO pretraining model (phileo.models.create_model)")
        for key in ("images", "coords", "cloud_fraction"):
            if key not in targets:
                raise KeyError(f"the batch has no {key!r} target (got {sorted(targets)}); PretrainDataset items "
                               f"carry image, coords and cloud_fraction")
        recon = outputs["reconstruction"].float()
        b = recon.shape[0] // n_views

        def per_view(t: torch.Tensor) -> torch.Tensor:  # repeat B-sample targets for each view
            return t.repeat(n_views, *([1] * (t.dim() - 1)))

        terms: dict[str, torch.Tensor] = {}
        terms["reconstruction"] = F.mse_loss(recon, targets["images"].float())
        terms["coords"] = F.mse_loss(outputs["coords"].float(), per_view(targets["coords"].float()))
        terms["clouds"] = soft_cross_entropy(outputs["clouds"], per_view(targets["cloud_fraction"].float())).mean()
        valid = targets.get("aux_valid_fraction")
        valid = per_view(valid.float().reshape(-1)) if valid is not None else None

        def aux_weight(target: str) -> torch.Tensor | None:  # per-target weight (PretrainDataset), else shared
            w = targets.get(f"{target}_weight")
            return per_view(w.float().reshape(-1)) if w is not None else valid

        if "buildings" in targets:
            pred = outputs["buildings"].float().reshape(n_views * b, -1)
            tgt = per_view(targets["buildings"].float().reshape(b, -1))
            terms["buildings"] = _weighted_mean(((pred - tgt) ** 2).mean(dim=-1), aux_weight("buildings"))
        if "landcover" in targets:
            terms["landcover"] = _weighted_mean(
                soft_cross_entropy(outputs["landcover"], per_view(targets["landcover"].float())),
                aux_weight("landcover"))
        if n_views >= 2:
            emb = outputs["embedding"].float()
            e1, e2 = emb[:b], emb[b:2 * b]
            terms["embedding_positive"] = (1.0 - F.cosine_similarity(e1, e2, dim=-1)).mean()
            if b >= 2:
                terms["embedding_negative"] = F.cosine_similarity(e1, e2.roll(1, dims=0), dim=-1).clamp(min=0).mean()
            else:  # one sample has no other sample to be contrasted with
                terms["embedding_negative"] = emb.new_zeros(())
            terms["embedding_distance"] = (e1 - e2).norm(dim=-1).mean()
        total = sum(self.weight(k) * v for k, v in terms.items())
        return total, terms


__all__ = ["FoundationLoss", "make_views", "random_flips", "random_erase", "soft_cross_entropy", "TERMS"]
