"""Confusion-matrix metrics against hand-computed values and an independent brute-force count."""

import math

import numpy as np
import pytest
import torch

from metaseg.metrics import (ConfusionMatrix, image_scores_from_confusions, mean_ci95, per_class_mean_ci95,
                             segmentation_scores)

NAN = float("nan")


def approx_nan(values):
    """pytest.approx that also matches NaN positions."""
    return pytest.approx(values, nan_ok=True)


def assert_scores_equal(a: dict, b: dict):
    assert set(a) == set(b)
    for key in a:
        assert a[key] == approx_nan(b[key]), key


def test_scores_from_hand_computed_confusion():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    s = segmentation_scores(pred[None], target[None], num_classes=4)
    # class 0: TP 1, FP 1 (pred 0 at gt 2), FN 1 -> IoU 1/3, F1 2/4
    # class 1: TP 3, FP 1, FN 0 -> IoU 3/4, F1 6/7; class 2: TP 1, FN 1 -> IoU 1/2, F1 2/3
    assert s["iou"][:3] == pytest.approx([1 / 3, 3 / 4, 1 / 2])
    assert s["f1"][:3] == pytest.approx([1 / 2, 6 / 7, 2 / 3])
    assert math.isnan(s["iou"][3])  # absent from both: excluded from the mean
    assert s["miou"] == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert s["pixel_acc"] == pytest.approx(5 / 7)  # the ignored pixel is not counted


def test_confusion_matrix_and_precision_recall_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    # rows = ground truth, columns = prediction; the ignored pixel (pred 2) is nowhere
    assert cm.mat.tolist() == [[1, 1, 0, 0], [0, 3, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    s = cm.compute()
    assert s["precision"] == approx_nan([1 / 2, 3 / 4, 1.0, NAN])  # TP / (TP + FP)
    assert s["recall"] == approx_nan([1 / 2, 1.0, 1 / 2, NAN])  # TP / (TP + FN)
    assert "fg_iou" not in s  # foreground scores only for binary tasks


def test_class_only_predicted_counts_as_zero_in_the_mean():
    # class 3 predicted but absent from the truth: IoU 0, kept in the mean; classes 1, 2 absent from both
    s = segmentation_scores(torch.tensor([[0, 3]]), torch.tensor([[0, 0]]), num_classes=4)
    assert s["iou"] == approx_nan([1 / 2, NAN, NAN, 0.0])
    assert s["miou"] == pytest.approx(1 / 4)
    assert s["precision"][3] == 0.0 and s["recall"][3] == 0.0  # zero_division = 0


def test_empty_prediction_of_a_binary_task():
    target = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 255]])
    pred = torch.zeros_like(target)  # predicts no foreground at all
    s = segmentation_scores(pred[None], target[None], num_classes=2)
    # background: TP 4, FP 3, FN 0 -> IoU 4/7, F1 8/11; foreground: TP 0, FN 3 -> 0
    assert s["iou"] == pytest.approx([4 / 7, 0.0])
    assert s["f1"] == pytest.approx([8 / 11, 0.0])
    assert s["precision"] == pytest.approx([4 / 7, 0.0]) and s["recall"] == pytest.approx([1.0, 0.0])
    assert s["miou"] == pytest.approx(2 / 7) and s["mf1"] == pytest.approx(4 / 11)
    assert s["fg_iou"] == 0.0 and s["fg_dice"] == 0.0
    assert s["pixel_acc"] == pytest.approx(4 / 7)


def test_binary_foreground_scores_in_both_reductions():
    target = torch.tensor([[[1, 1], [0, 0]], [[0, 0], [0, 0]]])
    pred = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 0]]])
    d = segmentation_scores(pred, target, 2, reduction="dataset")
    # pooled: fg TP 1, FN 1 -> IoU 1/2, Dice 2/3; bg TP 6, FP 1 -> IoU 6/7, F1 12/13
    assert d["iou"] == pytest.approx([6 / 7, 1 / 2]) and d["f1"] == pytest.approx([12 / 13, 2 / 3])
    assert d["miou"] == pytest.approx((6 / 7 + 1 / 2) / 2)
    assert d["fg_iou"] == pytest.approx(1 / 2) and d["fg_dice"] == pytest.approx(2 / 3)
    assert d["pixel_acc"] == pytest.approx(7 / 8)
    i = segmentation_scores(pred, target, 2, reduction="image")
    # image 1: bg IoU 2/3 F1 4/5, fg IoU 1/2 F1 2/3 -> mIoU 7/12, mF1 11/15, acc 3/4
    # image 2: no foreground anywhere -> fg NaN (excluded), bg 1 -> mIoU 1, mF1 1, acc 1
    assert i["miou"] == pytest.approx((7 / 12 + 1) / 2)
    assert i["mf1"] == pytest.approx((11 / 15 + 1) / 2)
    assert i["pixel_acc"] == pytest.approx((3 / 4 + 1) / 2)
    assert i["iou"] == pytest.approx([(2 / 3 + 1) / 2, 1 / 2])  # fg averaged over the image that has it
    assert i["fg_iou"] == pytest.approx(1 / 2) and i["fg_dice"] == pytest.approx(2 / 3)


def test_image_reduction_skips_a_fully_ignored_image():
    g = torch.Generator().manual_seed(1)
    p = torch.randint(0, 3, (2, 6, 6), generator=g)
    t = torch.randint(0, 3, (2, 6, 6), generator=g)
    with_ignored = segmentation_scores(torch.cat([p, p[:1]]), torch.cat([t, torch.full_like(t[:1], 255)]), 3,
                                       reduction="image")
    assert_scores_equal(with_ignored, segmentation_scores(p, t, 3, reduction="image"))


def _brute_force(pred: np.ndarray, target: np.ndarray, n: int, ignore: int = 255):
    """Per-class IoU/F1 by boolean counting, independent of the bincount path."""
    keep = target != ignore
    iou, f1 = [], []
    for c in range(n):
        tp = np.sum((pred == c) & (target == c) & keep)
        fp = np.sum((pred == c) & (target != c) & keep)
        fn = np.sum((pred != c) & (target == c) & keep)
        iou.append(tp / (tp + fp + fn) if tp + fp + fn else NAN)
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else NAN)
    return iou, f1


@pytest.mark.parametrize("num_classes", [2, 5])
def test_both_reductions_match_brute_force(num_classes):
    rng = np.random.default_rng(num_classes)
    target = rng.integers(0, num_classes, (5, 7, 9))
    target[rng.random(target.shape) < 0.1] = 255
    target[3] = 0  # an image where only class 0 is labelled
    pred = rng.integers(0, num_classes, (5, 7, 9))
    d = segmentation_scores(torch.from_numpy(pred), torch.from_numpy(target), num_classes)
    iou, f1 = _brute_force(pred, target, num_classes)
    assert d["iou"] == approx_nan(iou) and d["f1"] == approx_nan(f1)
    assert d["miou"] == pytest.approx(np.nanmean(iou))
    per_image = [_brute_force(pred[i], target[i], num_classes) for i in range(5)]
    i = segmentation_scores(torch.from_numpy(pred), torch.from_numpy(target), num_classes, reduction="image")
    assert i["miou"] == pytest.approx(np.mean([np.nanmean(iou) for iou, _ in per_image]))
    assert i["mf1"] == pytest.approx(np.mean([np.nanmean(f1) for _, f1 in per_image]))
    assert i["iou"] == approx_nan(np.nanmean(np.array([iou for iou, _ in per_image]), 0).tolist())


def test_accumulation_equals_one_shot():
    g = torch.Generator().manual_seed(0)
    p = torch.randint(0, 3, (4, 8, 8), generator=g)
    t = torch.randint(0, 3, (4, 8, 8), generator=g)
    cm = ConfusionMatrix(3)
    for i in range(4):
        cm.update(p[i], t[i])
    assert cm.compute()["miou"] == pytest.approx(segmentation_scores(p, t, 3)["miou"])


def test_batched_per_image_matrices_equal_one_image_at_a_time():
    g = torch.Generator().manual_seed(2)
    p = torch.randint(0, 4, (6, 5, 5), generator=g)
    t = torch.randint(0, 4, (6, 5, 5), generator=g)
    batched, single = ConfusionMatrix(4, per_image=True), ConfusionMatrix(4, per_image=True)
    batched.update(p[:4], t[:4])
    batched.update(p[4:], t[4:])
    for i in range(6):
        single.update(p[i], t[i])
    assert torch.equal(batched.image_matrices(), single.image_matrices())
    assert torch.equal(batched.image_matrices().sum(0), batched.mat)
    assert_scores_equal(batched.compute("image"), image_scores_from_confusions(single.image_matrices()))


def test_labels_outside_the_class_range_are_refused():
    with pytest.raises(ValueError, match="outside"):
        segmentation_scores(torch.tensor([[0, 1]]), torch.tensor([[0, 7]]), 3)
    with pytest.raises(ValueError, match="outside"):
        segmentation_scores(torch.tensor([[0, 5]]), torch.tensor([[0, 1]]), 3)  # would spill into the next row
    with pytest.raises(ValueError, match="reduction"):
        segmentation_scores(torch.tensor([[0]]), torch.tensor([[0]]), 3, reduction="mean")


def test_ci95_of_known_sample():
    r = mean_ci95([1.0, 2.0, 3.0, 4.0])
    # sample std = sqrt(5/3); 1.96 * std / 2
    assert r["mean"] == 2.5 and r["ci95"] == pytest.approx(1.96 * math.sqrt(5 / 3) / 2)
    assert mean_ci95([0.5])["ci95"] == 0.0
    # 0.2, 0.4, 0.6: mean 0.4, s = 0.2 -> 1.96 * 0.2 / sqrt(3) = 0.22632; NaN episodes are left out
    r = mean_ci95([0.2, NAN, 0.4, 0.6])
    assert r["mean"] == pytest.approx(0.4) and r["ci95"] == pytest.approx(0.392 / math.sqrt(3)) and r["n"] == 3
    pc = per_class_mean_ci95([[0.2, NAN], [0.4, 0.5], [0.6, NAN]])
    assert pc["mean"] == pytest.approx([0.4, 0.5]) and pc["ci95"] == pytest.approx([0.392 / math.sqrt(3), 0.0])
