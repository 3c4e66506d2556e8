"""Segmentation metrics from confusion matrices.

Accumulation (``ConfusionMatrix.update``, a ``bincount`` on the predictions' device) is
separate from the final ``compute``, and ``ignore_index`` pixels are dropped once, at
accumulation. Conventions, as in mmsegmentation:

* IoU_c = TP / (TP + FP + FN), F1_c (= Dice) = 2 TP / (2 TP + FP + FN).
* Means (mIoU, mF1) run over the classes present in the prediction or the ground truth; a
  class absent from both has NaN scores and is left out of the mean.
* ``reduction="dataset"`` accumulates one matrix over all images (VOC/Cityscapes);
  ``reduction="image"`` scores each image and averages the per-image means (the
  mDice/mIoU of the medical and polyp literature).
"""

from __future__ import annotations

import math

import torch


class ConfusionMatrix:
    """``num_classes x num_classes`` counts, rows = ground truth, columns = prediction."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device=None):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        keep = target != self.ignore_index
        t, p = target[keep].long(), pred[keep].long()
        if t.numel() and (int(t.max()) >= self.num_classes or int(t.min()) < 0):
            raise ValueError(f"target has labels outside [0, {self.num_classes}) besides ignore_index")
        n = self.num_classes
        self.mat += torch.bincount(t * n + p, minlength=n * n).view(n, n).to(self.mat.device)

    def compute(self) -> dict:
        return scores_from_confusion(self.mat)


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def scores_from_confusion(mat: torch.Tensor) -> dict:
    """Per-class IoU, F1, precision, recall and their means; pixel accuracy."""
    mat = mat.double().cpu()
    tp = mat.diag()
    gt = mat.sum(1)  # TP + FN
    pr = mat.sum(0)  # TP + FP
    union = gt + pr - tp
    present = union > 0
    nan = torch.full_like(tp, float("nan"))
    iou = torch.where(present, tp / union.clamp(min=1), nan)
    f1 = torch.where(present, 2 * tp / (gt + pr).clamp(min=1), nan)
    precision = torch.where(present, tp / pr.clamp(min=1), nan)
    recall = torch.where(present, tp / gt.clamp(min=1), nan)
    total = mat.sum()
    out = {
        "miou": _nanmean(iou.tolist()),
        "mf1": _nanmean(f1.tolist()),
        "pixel_acc": float(tp.sum() / total) if total > 0 else float("nan"),
        "iou": iou.tolist(),
        "f1": f1.tolist(),
        "precision": precision.tolist(),
        "recall": recall.tolist(),
    }
    if mat.shape[0] == 2:  # binary task: the foreground scores the literature reports
        out["fg_iou"], out["fg_dice"] = out["iou"][1], out["f1"][1]
    return out


def segmentation_scores(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
    reduction: str = "dataset",
) -> dict:
    """Scores of integer label maps ``pred`` and ``target`` of shape (N, H, W).

    ``reduction="dataset"`` pools all pixels; ``"image"`` averages per-image scores (each
    image's own mIoU/mF1 over the classes present in it), NaN-skipping per class.
    """
    if pred.dim() == 2:
        pred, target = pred.unsqueeze(0), target.unsqueeze(0)
    if reduction == "dataset":
        cm = ConfusionMatrix(num_classes, ignore_index, device=pred.device)
        cm.update(pred, target)
        return cm.compute()
    if reduction != "image":
        raise ValueError(f"reduction must be 'dataset' or 'image', got {reduction!r}")
    per_image = []
    for p, t in zip(pred, target):
        cm = ConfusionMatrix(num_classes, ignore_index, device=pred.device)
        cm.update(p, t)
        per_image.append(cm.compute())
    out = {k: _nanmean([s[k] for s in per_image]) for k in ("miou", "mf1", "pixel_acc")}
    for k in ("iou", "f1", "precision", "recall"):
        out[k] = [_nanmean([s[k][c] for s in per_image]) for c in range(num_classes)]
    if num_classes == 2:
        out["fg_iou"], out["fg_dice"] = out["iou"][1], out["f1"][1]
    return out


def mean_ci95(values: list[float]) -> dict:
    """Mean and half-width of the normal-approximation 95% interval, 1.96 * s / sqrt(n).

    This is the interval few-shot papers report over episodes; ``s`` is the sample standard
    deviation (n - 1). With one value the half-width is 0.
    """
    vals = [v for v in values if not math.isnan(v)]
    n = len(vals)
    if n == 0:
        return {"mean": float("nan"), "ci95": float("nan"), "n": 0}
    mean = sum(vals) / n
    if n == 1:
        return {"mean": mean, "ci95": 0.0, "n": 1}
    var = sum((v - mean) ** 2 for v in vals) / (n - 1)
    return {"mean": mean, "ci95": 1.96 * math.sqrt(var / n), "n": n}
