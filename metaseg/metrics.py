"""Segmentation metrics from confusion matrices, in the conventions the literature uses.

Accumulation (``ConfusionMatrix.update``: one ``bincount`` per batch, on the predictions'
device) is separate from the final ``compute``, and ``ignore_index`` pixels are dropped
once, at accumulation. Conventions, as in mmsegmentation:

* Rows are ground truth, columns prediction. Per class c: TP, FP (predicted c, truth not c),
  FN (truth c, predicted not c).
* IoU_c = TP / (TP + FP + FN); F1_c = Dice_c = 2 TP / (2 TP + FP + FN);
  precision_c = TP / (TP + FP); recall_c = TP / (TP + FN). A class absent from both
  prediction and ground truth has NaN scores (nothing to score); a class present in only one
  of them scores 0 (sklearn's ``zero_division=0`` for precision and recall).
* mIoU and mF1 average over the classes that are not NaN: classes absent from both the
  prediction and the ground truth are excluded from the mean.
* pixel accuracy = correctly labelled pixels / labelled pixels.
* Binary tasks (2 classes) also report the foreground-class scores ``fg_iou`` and
  ``fg_dice`` (class 1), the numbers vessel, polyp and lesion papers quote.

Two reductions, named everywhere a number is reported:

* ``dataset``: one matrix accumulated over all images, then scored (VOC, Cityscapes,
  mmsegmentation). Large images and frequent classes weigh more.
* ``image``: each image scored on its own matrix, then averaged over images (the
  mDice / mIoU of the medical and polyp literature). A per-class score averages over the
  images where that class is not NaN; an image with no labelled pixel is skipped.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from metaseg.utils.masks import IGNORE

REDUCTIONS = ("dataset", "image")
PER_CLASS = ("iou", "f1", "precision", "recall")
SUMMARY = ("miou", "mf1", "pixel_acc")


class ConfusionMatrix:
    """``num_classes x num_classes`` counts, rows = ground truth, columns = prediction.

    ``per_image=True`` also keeps one matrix per image (``num_classes**2`` integers each), from
    which ``compute("image")`` gives the image reduction and ``subset`` any subset of images.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE, device=None, per_image: bool = False):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self.per_image = per_image
        self._images: list[torch.Tensor] = []

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add integer label maps ``pred`` and ``target`` of shape (H, W) or (N, H, W)."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        if pred.dim() == 2:
            pred, target = pred.unsqueeze(0), target.unsqueeze(0)
        n, batch = self.num_classes, pred.shape[0]
        target = target.to(pred.device)
        keep = target != self.ignore_index
        t, p = target[keep].long(), pred[keep].long()
        if t.numel():
            lo, hi = torch.aminmax(torch.stack([t.min(), t.max(), p.min(), p.max()]))
            if int(lo) < 0 or int(hi) >= n:
                raise ValueError(f"labels outside [0, {n}) besides ignore_index={self.ignore_index} "
                                 f"in the prediction or the target")
        if self.per_image:
            image = torch.arange(batch, device=pred.device).view(-1, 1, 1).expand_as(target)[keep]
            counts = torch.bincount(image * n * n + t * n + p, minlength=batch * n * n).view(batch, n, n)
            self._images.append(counts.to(self.mat.device))
            self.mat += counts.sum(0).to(self.mat.device)
        else:
            self.mat += torch.bincount(t * n + p, minlength=n * n).view(n, n).to(self.mat.device)

    def image_matrices(self) -> torch.Tensor:
        """The per-image matrices, (num_images, C, C); needs ``per_image=True``."""
        if not self.per_image:
            raise RuntimeError("ConfusionMatrix(per_image=False) keeps no per-image matrices")
        if not self._images:
            return torch.zeros(0, self.num_classes, self.num_classes, dtype=torch.int64)
        return torch.cat(self._images).cpu()

    def compute(self, reduction: str = "dataset") -> dict:
        if reduction == "dataset":
            return scores_from_confusion(self.mat)
        if reduction == "image":
            return image_scores_from_confusions(self.image_matrices())
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _class_scores(mat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-class scores of one (C, C) or many (N, C, C) matrices, NaN where a class is absent."""
    mat = mat.double()
    tp = mat.diagonal(dim1=-2, dim2=-1)
    gt = mat.sum(-1)  # TP + FN
    pr = mat.sum(-2)  # TP + FP
    union = gt + pr - tp
    present = union > 0
    nan = torch.full_like(tp, float("nan"))
    total = mat.sum((-2, -1))
    return {
        "iou": torch.where(present, tp / union.clamp(min=1), nan),
        "f1": torch.where(present, 2 * tp / (gt + pr).clamp(min=1), nan),
        "precision": torch.where(present, tp / pr.clamp(min=1), nan),
        "recall": torch.where(present, tp / gt.clamp(min=1), nan),
        "pixel_acc": torch.where(total > 0, tp.sum(-1) / total.clamp(min=1), torch.full_like(total, float("nan"))),
    }


def _with_summary(per_class: dict[str, list[float]], pixel_acc: float, miou: float, mf1: float) -> dict:
    out = {"miou": miou, "mf1": mf1, "pixel_acc": pixel_acc, **per_class}
    if len(per_class["iou"]) == 2:  # binary task: the foreground scores the literature reports
        out["fg_iou"], out["fg_dice"] = per_class["iou"][1], per_class["f1"][1]
    return out


def scores_from_confusion(mat: torch.Tensor) -> dict:
    """Dataset reduction of one (C, C) matrix: per-class IoU, F1, precision, recall, means, accuracy."""
    s = _class_scores(mat.cpu())
    per_class = {k: s[k].tolist() for k in PER_CLASS}
    return _with_summary(per_class, float(s["pixel_acc"]), _nanmean(per_class["iou"]), _nanmean(per_class["f1"]))


def image_scores_from_confusions(mats: torch.Tensor) -> dict:
    """Image reduction of (N, C, C) per-image matrices: every score is a mean of per-image scores."""
    mats = mats.cpu()
    if mats.dim() != 3:
        raise ValueError(f"expected (num_images, C, C) matrices, got shape {tuple(mats.shape)}")
    s = _class_scores(mats)
    per_class = {k: torch.nanmean(s[k], 0).tolist() if len(mats) else [float("nan")] * mats.shape[-1]
                 for k in PER_CLASS}
    img_miou = torch.nanmean(s["iou"], -1)  # each image's own mean over its present classes
    img_mf1 = torch.nanmean(s["f1"], -1)
    return _with_summary(per_class, _nanmean(s["pixel_acc"].tolist()), _nanmean(img_miou.tolist()),
                         _nanmean(img_mf1.tolist()))


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def segmentation_scores(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    ignore_index: int = IGNORE,
    reduction: str = "dataset",
) -> dict:
    """Scores of integer label maps ``pred`` and ``target`` of shape (N, H, W) (or one (H, W)).

    Returns floats ``miou``, ``mf1``, ``pixel_acc`` (and ``fg_iou``, ``fg_dice`` for two
    classes) and per-class lists ``iou``, ``f1``, ``precision``, ``recall`` with NaN for a
    class absent from both. ``reduction="dataset"`` pools all pixels; ``"image"`` averages
    per-image scores. See the module docstring for the conventions.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    cm = ConfusionMatrix(num_classes, ignore_index, device=pred.device, per_image=reduction == "image")
    cm.update(pred, target)
    return cm.compute(reduction)


def mean_ci95(values: Sequence[float]) -> dict:
    """Mean and half-width of the normal-approximation 95% interval, 1.96 * s / sqrt(n).

    This is the interval few-shot papers report over episodes; ``s`` is the sample standard
    deviation (n - 1). NaN values are left out; with one value the half-width is 0.
    """
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    n = len(vals)
    if n == 0:
        return {"mean": float("nan"), "ci95": float("nan"), "n": 0}
    mean = sum(vals) / n
    if n == 1:
        return {"mean": mean, "ci95": 0.0, "n": 1}
    var = sum((v - mean) ** 2 for v in vals) / (n - 1)
    return {"mean": mean, "ci95": 1.96 * math.sqrt(var / n), "n": n}


def per_class_mean_ci95(rows: Sequence[Sequence[float]], num_classes: Optional[int] = None) -> dict:
    """``mean_ci95`` of each class over ``rows`` (one per-class list per episode): lists ``mean``, ``ci95``."""
    num_classes = num_classes if num_classes is not None else (len(rows[0]) if rows else 0)
    cols = [mean_ci95([r[c] for r in rows]) for c in range(num_classes)]
    return {"mean": [c["mean"] for c in cols], "ci95": [c["ci95"] for c in cols]}
