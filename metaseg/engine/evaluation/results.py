"""Evaluation results as typed values: what ``eval.json`` and ``metrics.json`` hold, read in one place.

The protocol builds a :class:`DatasetResult` per dataset; ``to_dict`` writes exactly the structure
docs/evaluation.md documents (the first k's summary at the top level of ``adapted``, every k under
its own key, per-episode scores, the curve with string keys), so the files a user reads stay what
they were. Everything that reads results (the log, tensorboard, ``eval.md``/``eval.csv``, the
summary beside the random-init baseline, the study and comparison scripts) parses them with
``from_dict`` and asks for a score by metric and reduction, instead of walking
``res["adapted"][k]["image"][key]["mean"]`` itself. ``from_dict`` accepts what a hand-made or partial
result leaves out (no image reduction, no per-episode scores), as the summary's tests build them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np

SUMMARY_KEYS = ("miou", "mf1", "pixel_acc")
BINARY_KEYS = ("fg_iou", "fg_dice")
IMAGE = "image"  # the image reduction's entry; the dataset reduction is the top level
_SHOT_FIELDS = ("shots", "episodes", "adapt_steps", "adapt_lr", "scored")


def _reduction(dataset: Mapping[str, Any], image: Mapping[str, Any], reduction: str) -> Mapping[str, Any]:
    """The scores of ``reduction``: ``dataset`` (one confusion matrix over all images) or ``image``."""
    if reduction not in ("dataset", IMAGE):
        raise ValueError(f"reduction must be dataset or image, got {reduction!r}")
    return image if reduction == IMAGE else dataset


@dataclass(frozen=True)
class Estimate:
    """A mean over episodes with its 95% half-width (floats, or per-class lists of them); ``n`` the
    episodes with a value where recorded, ``per_episode`` each episode's value (curve points)."""

    mean: Any
    ci95: Any
    n: Optional[int] = None
    per_episode: Optional[list[float]] = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Estimate:
        return cls(d.get("mean"), d.get("ci95"), d.get("n"), d.get("per_episode"))

    def to_dict(self) -> dict:
        out = {"mean": self.mean, "ci95": self.ci95}
        if self.n is not None:
            out["n"] = self.n
        if self.per_episode is not None:
            out["per_episode"] = list(self.per_episode)
        return out


@dataclass(frozen=True)
class Scores:
    """One scoring of a set of images (zero-shot): each score of the dataset reduction, and of the image one."""

    dataset: dict[str, Any]
    image: dict[str, Any] = field(default_factory=dict)

    def get(self, metric: str, reduction: str = "dataset") -> Any:
        """The score (a float, or a per-class list), None where it was not computed."""
        return _reduction(self.dataset, self.image, reduction).get(metric)

    def has(self, metric: str, reduction: str = "dataset") -> bool:
        return metric in _reduction(self.dataset, self.image, reduction)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Scores:
        return cls({k: v for k, v in d.items() if k != IMAGE}, dict(d.get(IMAGE) or {}))

    def to_dict(self) -> dict:
        return {**self.dataset, IMAGE: dict(self.image)}


@dataclass(frozen=True)
class Episode:
    """One episode of one k: its support images, the seed of its draw, its summary scores in both reductions."""

    support: list[int]
    seed: list[int]
    dataset: dict[str, float]
    image: dict[str, float] = field(default_factory=dict)

    def get(self, metric: str, reduction: str = "dataset") -> Optional[float]:
        return _reduction(self.dataset, self.image, reduction).get(metric)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Episode:
        scores = {k: v for k, v in d.items() if k not in ("support", "seed")}
        return cls(d.get("support"), d.get("seed"), {k: v for k, v in scores.items() if not k.startswith("image_")},
                   {k.removeprefix("image_"): v for k, v in scores.items() if k.startswith("image_")})

    def to_dict(self) -> dict:
        return {"support": self.support, "seed": self.seed, **self.dataset,
                **{f"image_{k}": v for k, v in self.image.items()}}


@dataclass(frozen=True)
class ShotResult:
    """One k's episodes on one dataset: every score's mean and interval over them, and each episode's."""

    shots: Optional[int]
    episodes: Optional[int]
    adapt_steps: Optional[int]
    adapt_lr: Optional[float]
    scored: Optional[int]
    dataset: dict[str, Estimate]
    image: dict[str, Estimate] = field(default_factory=dict)
    per_episode: list[Episode] = field(default_factory=list)

    def get(self, metric: str, reduction: str = "dataset") -> Optional[Estimate]:
        """The metric's estimate over episodes, None where it was not computed."""
        return _reduction(self.dataset, self.image, reduction).get(metric)

    def has(self, metric: str, reduction: str = "dataset") -> bool:
        return metric in _reduction(self.dataset, self.image, reduction)

    def values(self, metric: str, reduction: str = "dataset") -> list[float]:
        """Each episode's score, in episode order (seeded: two models' lists pair up)."""
        return [ep.get(metric, reduction) for ep in self.per_episode]

    @property
    def supports(self) -> list[list[int]]:
        return [ep.support for ep in self.per_episode]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShotResult:
        scores = {k: Estimate.from_dict(v) for k, v in d.items()
                  if k not in (*_SHOT_FIELDS, IMAGE, "per_episode") and not k.isdigit() and isinstance(v, Mapping)}
        return cls(*(d.get(k) for k in _SHOT_FIELDS), scores,
                   {k: Estimate.from_dict(v) for k, v in (d.get(IMAGE) or {}).items()},
                   [Episode.from_dict(ep) for ep in d.get("per_episode") or []])

    def to_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in _SHOT_FIELDS}, **{k: e.to_dict() for k, e in self.dataset.items()},
                IMAGE: {k: e.to_dict() for k, e in self.image.items()},
                "per_episode": [ep.to_dict() for ep in self.per_episode]}


@dataclass(frozen=True)
class Curve:
    """The adaptation curve: ``metric`` after each step count, per k followed: ``points[k][steps]``."""

    metric: str
    points: dict[int, dict[int, Estimate]]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Curve:
        return cls(d["metric"], {int(k): {int(t): Estimate.from_dict(v) for t, v in by_steps.items()}
                                 for k, by_steps in d["shots"].items()})

    def to_dict(self) -> dict:
        """``{"metric", "shots": {k: {steps: {"mean", "ci95", "per_episode"}}}}``, keys strings as JSON has them."""
        return {"metric": self.metric, "shots": {str(k): {str(t): e.to_dict() for t, e in by_steps.items()}
                                                 for k, by_steps in self.points.items()}}


@dataclass(frozen=True)
class DatasetResult:
    """One dataset through the protocol: zero-shot, every k's episodes (in the order run), the curve."""

    images: Optional[int]
    scored: Optional[int]
    zero_shot: Scores
    adapted: dict[int, ShotResult] = field(default_factory=dict)
    curve: Optional[Curve] = None
    window: Optional[list[int]] = None  # eval.mode=slide
    stride: Optional[list[int]] = None

    @property
    def first(self) -> Optional[ShotResult]:
        """The first k of ``eval.shots``: the top-level ``adapted`` scores of eval.json."""
        return next(iter(self.adapted.values()), None)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DatasetResult:
        adapted = d.get("adapted") or {}
        shots = {int(k): ShotResult.from_dict(v) for k, v in adapted.items() if k.isdigit()}
        if adapted and not shots:  # a single k, summarised at the top level only
            shots = {int(adapted["shots"]): ShotResult.from_dict(adapted)}
        curve = Curve.from_dict(d["curve"]) if d.get("curve") else None
        return cls(d.get("images"), d.get("scored"), Scores.from_dict(d.get("zero_shot") or {}), shots, curve,
                   d.get("window"), d.get("stride"))

    def to_dict(self) -> dict:
        out: dict = {"images": self.images, "scored": self.scored, "zero_shot": self.zero_shot.to_dict()}
        if self.window is not None:
            out["window"], out["stride"] = list(self.window), list(self.stride)
        if self.adapted:
            out["adapted"] = {**self.first.to_dict(), **{str(k): s.to_dict() for k, s in self.adapted.items()}}
        if self.curve is not None:
            out["curve"] = self.curve.to_dict()
        return out


@dataclass(frozen=True)
class Results:
    """Every scored dataset of an evaluation (held-out, validation, or the baseline's) and the stored means."""

    datasets: dict[str, DatasetResult]
    mean: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]]) -> Results:
        d = d or {}
        return cls({name: DatasetResult.from_dict(r) for name, r in (d.get("datasets") or {}).items()},
                   dict(d.get("mean") or {}))

    @property
    def shots(self) -> list[int]:
        """The k of the episodes, in the order they were run (none for zero-shot only)."""
        for res in self.datasets.values():
            if res.adapted:
                return list(res.adapted)
        return []


def dataset_means(datasets: Mapping[str, DatasetResult]) -> dict:
    """eval.json's ``mean``: each summary score averaged over the datasets, zero-shot and adapted (the
    first k, and every k's mIoU and mF1); the foreground's scores where every dataset is binary."""
    per = list(datasets.values())
    mean = {"zero_shot_miou": float(np.mean([r.zero_shot.get("miou") for r in per])),
            "zero_shot_mf1": float(np.mean([r.zero_shot.get("mf1") for r in per]))}
    for key in BINARY_KEYS:  # binary label spaces: the foreground's zero-shot scores (erm's best.pt, learning curve)
        if per and all(r.zero_shot.has(key) for r in per):
            mean[f"zero_shot_{key}"] = float(np.mean([r.zero_shot.get(key) for r in per]))
    if per and all(r.adapted for r in per):
        mean["adapted_miou"] = float(np.mean([r.first.get("miou").mean for r in per]))
        mean["adapted_mf1"] = float(np.mean([r.first.get("mf1").mean for r in per]))
        for key in BINARY_KEYS:  # binary label spaces: the foreground's own scores (tune, best.pt can use them)
            if all(r.first.has(key) for r in per):
                mean[f"adapted_{key}"] = float(np.mean([r.first.get(key).mean for r in per]))
        mean["adapted"] = {str(k): {m: float(np.mean([r.adapted[k].get(m).mean for r in per])) for m in ("miou", "mf1")}
                           for k in per[0].adapted}
    return mean


def summary_keys(scores: Mapping[str, Any]) -> tuple[str, ...]:
    """The summary scores ``scores`` has: mIoU, mF1, pixel accuracy, and the foreground's for a binary task."""
    return SUMMARY_KEYS + tuple(k for k in BINARY_KEYS if k in scores)


def estimates(summary: Mapping[str, Mapping[str, Any]]) -> dict[str, Estimate]:
    """``{metric: {"mean", "ci95"[, "n"]}}`` (``metrics.mean_ci95``'s dicts) as estimates."""
    return {k: Estimate.from_dict(v) for k, v in summary.items()}
