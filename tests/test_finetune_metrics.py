"""Test-set metrics checked by hand on tiny cases: a perfect predictor, a constant one, and ignored pixels."""

from __future__ import annotations

import pytest
import torch

from phileo.bench.metrics import IGNORE_INDEX, RegressionMetrics, SegmentationMetrics


def test_regression_perfect_predictor():
    target = torch.tensor([[[[0.0, 0.2], [0.7, 1.0]]]])
    m = RegressionMetrics()
    m.update(target.clone(), target)
    r = m.compute()
    assert r["mse"] == r["rmse"] == r["mae"] == 0.0
    assert r["accuracy"] == r["precision"] == r["recall"] == r["f1"] == 1.0
    assert r["n_pixels"] == 4


def test_regression_constant_predictor_by_hand():
    # Targets 0, 0.2, 0.7, 1.0; prediction 0.25 everywhere.
    # errors 0.25, 0.05, -0.45, -0.75: MSE = (0.0625 + 0.0025 + 0.2025 + 0.5625)/4 = 0.2075, MAE = 1.5/4 = 0.375.
    # Thresholded at 0.5: nothing predicted positive, 2 true positives missed -> accuracy 0.5, P = R = F1 = 0.
    target = torch.tensor([0.0, 0.2, 0.7, 1.0]).reshape(1, 1, 2, 2)
    m = RegressionMetrics(threshold=0.5)
    m.update(torch.full_like(target, 0.25), target)
    r = m.compute()
    assert r["mse"] == pytest.approx(0.2075)
    assert r["rmse"] == pytest.approx(0.2075 ** 0.5)
    assert r["mae"] == pytest.approx(0.375)
    assert r["accuracy"] == 0.5 and r["precision"] == 0.0 and r["recall"] == 0.0 and r["f1"] == 0.0


def test_regression_thresholded_scores_by_hand():
    # pred > 0.5: [T, T, F, F]; target > 0.5: [T, F, T, F] -> tp 1, fp 1, fn 1, tn 1.
    pred = torch.tensor([0.9, 0.6, 0.1, 0.0])
    target = torch.tensor([1.0, 0.0, 0.8, 0.3])
    m = RegressionMetrics()
    m.update(pred, target)
    r = m.compute()
    assert (r["accuracy"], r["precision"], r["recall"], r["f1"]) == (0.5, 0.5, 0.5, 0.5)


def test_regression_batches_add_up_like_one_pass():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.rand(6, 1, 4, 4, generator=g), torch.rand(6, 1, 4, 4, generator=g)
    whole = RegressionMetrics()
    whole.update(pred, target)
    a, b = RegressionMetrics(), RegressionMetrics()
    a.update(pred[:2], target[:2])
    b.update(pred[2:], target[2:])
    merged = a.merge(b).all_reduce().compute()  # all_reduce is a no-op without a process group
    for k, v in whole.compute().items():
        assert merged[k] == pytest.approx(v)
    assert whole.compute()["mse"] == pytest.approx(float(((pred - target) ** 2).mean()))
    with pytest.raises(ValueError, match="shape"):
        whole.update(pred, target[:, :, :2])
    with pytest.raises(ValueError, match="empty"):
        RegressionMetrics().compute()


def test_segmentation_perfect_predictor():
    target = torch.tensor([[[0, 1], [2, 2]]])
    m = SegmentationMetrics(num_classes=4)
    m.update(target.clone(), target)
    r = m.compute()
    assert r["overall_accuracy"] == r["miou"] == r["macro_f1"] == r["macro_precision"] == r["macro_recall"] == 1.0
    assert r["micro_f1"] == 1.0
    assert r["per_class_iou"] == [1.0, 1.0, 1.0, None]  # class 3 absent from labels and predictions
    assert r["per_class_support"] == [1, 1, 2, 0]


def test_segmentation_constant_predictor_by_hand():
    # Labels: 0, 1, 2, 2 (one pixel ignored); prediction: class 2 everywhere.
    # Accuracy 2/4. Class 2: P = 2/4, R = 1, F1 = 2/3, IoU = 2/4. Classes 0, 1: P = R = F1 = IoU = 0.
    # Macro over the 3 classes that appear: P = 1/6, R = 1/3, F1 = 2/9, mIoU = 1/6.
    target = torch.tensor([[[0, 1, IGNORE_INDEX], [2, 2, IGNORE_INDEX]]])
    logits = torch.zeros(1, 4, 2, 3)
    logits[:, 2] = 1.0
    m = SegmentationMetrics(num_classes=4)
    m.update(logits, target)
    r = m.compute()
    assert r["n_pixels"] == 4
    assert r["overall_accuracy"] == pytest.approx(0.5)
    assert r["per_class_precision"][:3] == pytest.approx([0.0, 0.0, 0.5])
    assert r["per_class_precision"][3] is None
    assert r["per_class_recall"][:3] == pytest.approx([0.0, 0.0, 1.0])
    assert r["per_class_iou"][:3] == pytest.approx([0.0, 0.0, 0.5])
    assert r["macro_precision"] == pytest.approx(1 / 6)
    assert r["macro_recall"] == pytest.approx(1 / 3)
    assert r["macro_f1"] == pytest.approx(2 / 9)
    assert r["miou"] == pytest.approx(1 / 6)
    assert r["micro_precision"] == r["micro_recall"] == r["micro_f1"] == pytest.approx(0.5)


def test_segmentation_batches_merge_and_refuse_bad_indices():
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, 5, (4, 6, 6), generator=g)
    pred = torch.randint(0, 5, (4, 6, 6), generator=g)
    whole = SegmentationMetrics(5)
    whole.update(pred, target)
    a, b = SegmentationMetrics(5), SegmentationMetrics(5)
    a.update(pred[:1], target[:1])
    b.update(pred[1:], target[1:])
    assert torch.equal(a.merge(b).confusion, whole.confusion)
    assert whole.compute()["overall_accuracy"] == pytest.approx(float((pred == target).double().mean()))
    with pytest.raises(ValueError, match="label class index outside 0..4"):
        whole.update(pred, target + 3)
    with pytest.raises(ValueError, match="logits have 3 channels, expected 5"):
        whole.update(torch.zeros(4, 3, 6, 6), target)
