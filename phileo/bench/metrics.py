"""Test-set metrics of the PhilEO Bench tasks, accumulated batch by batch and summed across ranks.

The test set (every `*_test_s2.npy` patch) does not fit in memory as predictions, so each metric keeps only
sums (regression) or a confusion matrix (land cover), updated per batch; under DDP each rank evaluates its
share and `all_reduce()` adds the states before `compute()`. Sums are float64/int64 so that billions of pixels
add up without rounding drift.

Conventions (sklearn's, so figures compare with the usual tools):
- regression (roads, building): MSE, RMSE, MAE over all pixels; for the thresholded scores a pixel is positive
  when its value is > threshold (0.5), in the prediction and in the label alike; a ratio with a zero
  denominator (no positive prediction, say) is 0.
- land cover: pixels labelled IGNORE_INDEX are skipped. Per-class precision, recall, F1 and IoU are None for a
  class that appears in neither labels nor predictions; macro averages are over the classes that appear in
  either, with an undefined ratio counted as 0; micro averages (= overall accuracy for single-label pixels)
  are reported too; mIoU is the mean IoU over the classes that appear.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

IGNORE_INDEX = -100


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # NCCL reduces only CUDA tensors; gloo only CPU ones: follow the process group's backend.
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        buf = t.to(device)
        dist.all_reduce(buf)
        return buf.to(t.device)
    return t


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


class RegressionMetrics:
    """MSE, RMSE, MAE and thresholded accuracy/precision/recall/F1 of a dense regression (roads, buildings).

    update(pred, target): tensors of the same shape (any layout, e.g. (B, 1, S, S)); compute() -> dict of floats
    with keys mse, rmse, mae, accuracy, precision, recall, f1, n_pixels. Refuses mismatched shapes.
    """

    def __init__(self, threshold: float = 0.5):
        self.threshold = float(threshold)
        self.reset()

    def reset(self) -> None:
        # sum_sq, sum_abs, n, tp, fp, fn, tn
        self.state = torch.zeros(7, dtype=torch.float64)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(target.shape)}")
        pred, target = pred.detach().double(), target.detach().double()
        err = pred - target
        p, t = pred > self.threshold, target > self.threshold
        self.state += torch.stack([
            (err * err).sum().cpu(), err.abs().sum().cpu(), torch.tensor(float(err.numel())),
            (p & t).sum().double().cpu(), (p & ~t).sum().double().cpu(), (~p & t).sum().double().cpu(),
            (~p & ~t).sum().double().cpu(),
        ])

    def merge(self, other: "RegressionMetrics") -> "RegressionMetrics":
        self.state += other.state
        return self

    def all_reduce(self) -> "RegressionMetrics":
        """Sums the state over all ranks (no-op without an initialised process group)."""
        self.state = _all_reduce_sum(self.state)
        return self

    def compute(self) -> dict[str, float]:
        sum_sq, sum_abs, n, tp, fp, fn, tn = self.state.tolist()
        if n == 0:
            raise ValueError("no pixels were evaluated: the test set is empty")
        precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
        return {
            "mse": sum_sq / n, "rmse": (sum_sq / n) ** 0.5, "mae": sum_abs / n,
            "accuracy": (tp + tn) / n, "precision": precision, "recall": recall,
            "f1": _ratio(2 * precision * recall, precision + recall), "n_pixels": int(n),
        }


class SegmentationMetrics:
    """Overall accuracy, per-class precision/recall/F1/IoU, macro and micro averages and mIoU (land cover).

    update(pred, target): target (B, S, S) class indices (IGNORE_INDEX skipped); pred either class indices of
    the same shape or logits (B, C, S, S) (argmax over C). compute() -> dict; see the module docstring for the
    conventions. Refuses class indices outside 0..num_classes-1 and mismatched shapes.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX,
                 class_names: Sequence[str] | None = None):
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else None
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)  # [true, predicted]

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.ndim == target.ndim + 1:
            if pred.shape[1] != self.num_classes:
                raise ValueError(f"logits have {pred.shape[1]} channels, expected {self.num_classes} classes")
            pred = pred.argmax(dim=1)
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(target.shape)}")
        keep = target != self.ignore_index
        t, p = target[keep].long(), pred[keep].long()
        for name, v in (("label", t), ("prediction", p)):
            if v.numel() and (int(v.min()) < 0 or int(v.max()) >= self.num_classes):
                raise ValueError(f"{name} class index outside 0..{self.num_classes - 1} "
                                 f"(min {int(v.min())}, max {int(v.max())}); ignored pixels must be {self.ignore_index}")
        self.confusion += torch.bincount(t * self.num_classes + p, minlength=self.num_classes ** 2) \
            .reshape(self.num_classes, self.num_classes).cpu()

    def merge(self, other: "SegmentationMetrics") -> "SegmentationMetrics":
        self.confusion += other.confusion
        return self

    def all_reduce(self) -> "SegmentationMetrics":
        """Sums the confusion matrix over all ranks (no-op without an initialised process group)."""
        self.confusion = _all_reduce_sum(self.confusion)
        return self

    def compute(self) -> dict[str, Any]:
        cm = self.confusion.double()
        total = float(cm.sum())
        if total == 0:
            raise ValueError("no labelled pixels were evaluated: the test set is empty or all ignored")
        tp = cm.diag()
        support, predicted = cm.sum(1), cm.sum(0)
        present = (support + predicted) > 0
        per_class: dict[str, list[float | None]] = {"precision": [], "recall": [], "f1": [], "iou": []}
        for c in range(self.num_classes):
            if not present[c]:
                for v in per_class.values():
                    v.append(None)
                continue
            p = _ratio(tp[c], predicted[c])
            r = _ratio(tp[c], support[c])
            per_class["precision"].append(p)
            per_class["recall"].append(r)
            per_class["f1"].append(_ratio(2 * p * r, p + r))
            per_class["iou"].append(_ratio(tp[c], support[c] + predicted[c] - tp[c]))
        n_present = int(present.sum())

        def macro(key: str) -> float:
            return sum(v for v in per_class[key] if v is not None) / n_present

        accuracy = float(tp.sum()) / total
        out: dict[str, Any] = {
            "overall_accuracy": accuracy,
            "macro_precision": macro("precision"), "macro_recall": macro("recall"), "macro_f1": macro("f1"),
            # Each pixel has exactly one true and one predicted class, so micro P = micro R = micro F1 = accuracy.
            "micro_precision": accuracy, "micro_recall": accuracy, "micro_f1": accuracy,
            "miou": macro("iou"),
            "per_class_precision": per_class["precision"], "per_class_recall": per_class["recall"],
            "per_class_f1": per_class["f1"], "per_class_iou": per_class["iou"],
            "per_class_support": [int(s) for s in support.tolist()],
            "n_pixels": int(total),
        }
        if self.class_names is not None:
            out["class_names"] = self.class_names
        return out


__all__ = ["RegressionMetrics", "SegmentationMetrics", "IGNORE_INDEX"]
