"""Confusion-matrix metrics against hand-computed values."""

import math

import pytest
import torch

from metaseg.metrics import ConfusionMatrix, mean_ci95, segmentation_scores


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


def test_accumulation_equals_one_shot():
    g = torch.Generator().manual_seed(0)
    p = torch.randint(0, 3, (4, 8, 8), generator=g)
    t = torch.randint(0, 3, (4, 8, 8), generator=g)
    cm = ConfusionMatrix(3)
    for i in range(4):
        cm.update(p[i], t[i])
    assert cm.compute()["miou"] == pytest.approx(segmentation_scores(p, t, 3)["miou"])


def test_ci95_of_known_sample():
    r = mean_ci95([1.0, 2.0, 3.0, 4.0])
    # sample std = sqrt(5/3); 1.96 * std / 2
    assert r["mean"] == 2.5 and r["ci95"] == pytest.approx(1.96 * math.sqrt(5 / 3) / 2)
    assert mean_ci95([0.5])["ci95"] == 0.0
