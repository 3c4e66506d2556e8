"""The held-out protocol: zero-shot once, then seeded few-shot episodes for every k, scored on the rest.

For each held-out dataset of n images:

1. **Zero-shot.** theta as it is scores every image (the first ``eval.max_images`` if set).
2. **Episodes.** Episode e draws one permutation of the n images from
   ``numpy.random.default_rng([seed, crc32(dataset name), e])``. For each k of ``eval.shots``
   the support is its first k images (so the 1-shot support of an episode is inside its
   5-shot support) and the query is the rest after the largest k (with ``eval.max_images``,
   the next that many of the permutation, so episodes score different images): every k of an
   episode is scored on the same images, so columns of a table compare like with like. Every (k,
   episode) adapts a fresh copy of theta (``MetaLearner.adapt``; theta is never modified),
   with ``eval.adapt_steps`` / ``eval.adapt_lr`` (default: the checkpoint's K and alpha).
3. **Summary.** For each k, the mean and 95% interval (1.96 s / sqrt(episodes)) of every
   score over the episodes.
4. **Adaptation curve** (``eval.curve_steps``, off by default). On the same episodes and query
   images, the score after each listed number of steps S (0: theta itself, or the new head's
   prototype start), for every k: the figure where meta-learning claims its advantage. One
   adaptation per (k, episode) runs to the largest S and is scored on the way
   (``MetaLearner.adapt``'s ``visit``), so it costs one adaptation, not one per S, and gives
   the numbers a separate ``eval.adapt_steps=S`` run gives. Learned per-step rates (Meta-SGD,
   MAML++) reuse the last trained step's rates beyond K, as ``adapt`` always does.

Under torchrun the episodes are split over the processes (``metaseg.engine.distributed``) and
gathered in episode order, so every process returns the numbers one process would.

Scores come from confusion matrices (``metaseg.metrics``): the top-level numbers are the
dataset reduction, ``"image"`` holds the image reduction. Scoring runs under
``torch.inference_mode`` in batches (``metaseg.engine.evaluation.scoring``); only adaptation builds a
graph.

The ``eval`` block arrives checked, as :class:`~metaseg.engine.evaluation.settings.EvalSettings`
(a public entry point given a config checks it first); each dataset's scores are built as a
:class:`~metaseg.engine.evaluation.results.DatasetResult` and written as ``eval.json`` has them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
import zlib
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from metaseg.data.tasks import collate
from metaseg.data.view import SegmentationDataset
from metaseg.engine.distributed import episode_share, gather, is_main
from metaseg.engine.evaluation.report import render_gallery
from metaseg.engine.evaluation.results import (Curve, DatasetResult, Episode, Estimate, Scores, ShotResult,
                                               dataset_means, estimates, summary_keys)
from metaseg.engine.evaluation.scoring import predictions
from metaseg.engine.evaluation.settings import EvalSettings, validate_eval
from metaseg.meta import MetaLearner
from metaseg.metrics import PER_CLASS, ConfusionMatrix, mean_ci95, per_class_mean_ci95
from metaseg.utils.errors import ConfigError
from metaseg.utils.masks import IGNORE

log = logging.getLogger(__name__)


class EvalResult(dict):
    """The ``eval.json`` structure, plus ``pictures`` (dataset name -> uint8 (3, H, W) PNG grid)
    and ``seconds`` (dataset name -> wall time).

    A ``dict`` so that every existing consumer (``write_json``, ``metrics.json``) sees plain,
    reproducible data; pictures and timings ride along as attributes because they are not
    JSON or not reproducible.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pictures: dict[str, torch.Tensor] = {}
        self.seconds: dict[str, float] = {}


# -- what is scored, and how ----------------------------------------------------------------
def curve_metric(num_classes: int) -> str:
    """The curve's score: foreground Dice for a binary label space (what vessel, polyp and lesion
    papers plot), mIoU otherwise; both the dataset reduction, like the top-level scores."""
    return "fg_dice" if num_classes == 2 else "miou"


PATCH_MODE_FIX = ("data.patches=true: the model works on patches, so whole images are scored with a sliding "
                  "window; set eval.mode=slide")


def patch_mode(dataset: SegmentationDataset, name: str, settings: EvalSettings, validation: bool) -> EvalSettings:
    """``settings`` for scoring ``dataset``: a patch model (``data.patches``) scores whole images by
    sliding window, so ``resize`` (which would score one centre patch) is an error for held-out
    data; ``validation`` tasks are switched to ``slide`` with the evaluation's window and stride.
    They once scored centre patches, a cheap proxy that misled: the centre of a fundus photograph
    is its nearly vessel-free fovea, so validation Dice there said nothing about vessels."""
    if not dataset.serves_patches or settings.mode == "slide":
        return settings
    if not validation:
        raise ConfigError(f"dataset {name!r}: {PATCH_MODE_FIX}")
    return dataclasses.replace(settings, mode="slide")


def check_heldout_sizes(datasets: dict[str, Dataset], cfg: Any) -> None:
    """Every held-out dataset must keep at least one image to score after the largest support
    (``cfg``: ``EvalSettings``, or an ``EvalConfig`` checked here)."""
    settings = validate_eval(cfg)
    largest = max(settings.episode_shots, default=0)
    if not largest:
        return
    for name, ds in datasets.items():
        if len(ds) <= largest:
            raise ConfigError(f"held-out dataset {name!r} has {len(ds)} images: eval.shots={largest} leaves "
                              f"none to score; lower eval.shots")


def sliding_window(dataset: Dataset, settings: EvalSettings) -> tuple[tuple[int, int], tuple[int, int]]:
    """Window (h, w) and stride (h, w) for ``eval.mode=slide``: default window = the training size."""
    if settings.window is not None:
        window = (int(settings.window), int(settings.window))
    else:
        h, w = dataset[0][0].shape[-2:]
        window = (int(h), int(w))
    if settings.stride is not None:
        stride = (int(settings.stride), int(settings.stride))
    else:
        stride = (max(window[0] // 2, 1), max(window[1] // 2, 1))
    return window, stride


# -- scoring ------------------------------------------------------------------------------
@torch.inference_mode()
def score(model: nn.Module, dataset: Dataset, indices: Sequence[int], num_classes: int,
          device: torch.device, batch_size: int, precision, *, mode: str = "resize",
          window=None, stride=None, capture: Optional[dict] = None) -> dict:
    """Scores of ``model`` on ``indices``: dataset reduction at the top level, image reduction in ``"image"``.

    ``capture``: a dict whose keys are image indices; their predicted label maps are stored
    in it (on the CPU), so pictures show exactly what was scored.
    """
    model.eval()
    cm = ConfusionMatrix(num_classes, IGNORE, device=device, per_image=True)
    for chunk, pred, mask in predictions(model, dataset, indices, device, batch_size, precision,
                                         mode=mode, window=window, stride=stride):
        cm.update(pred, mask)
        if capture is not None:
            for j, i in enumerate(chunk):
                if i in capture:
                    capture[i] = pred[j].to("cpu", torch.int64)
    out = cm.compute("dataset")
    out["image"] = cm.compute("image")
    return out


def support_batch(dataset: SegmentationDataset, support: Sequence[int], cfg: Any, key: Sequence[int]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The images an episode adapts on: the support images themselves, or, when the dataset
    serves patches (``data.patches``), ``eval.support_patches`` random patches of each, their
    places drawn from a generator seeded by ``key`` (seed, dataset, episode, k)."""
    if not dataset.serves_patches:
        return collate(dataset, support)
    g = torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))
    return dataset.support_patches(support, int(cfg.support_patches), g)


def query_of(order: np.ndarray, largest: int, cap: Optional[int]) -> list[int]:
    """An episode's query: its permutation after the largest support, the next ``cap`` of them if
    capped. Taken from the permutation, not the lowest image numbers, so capped episodes score
    different images and their interval covers the choice of images."""
    rest = order[largest:]
    return sorted(rest[:cap].tolist() if cap else rest.tolist())


def episode_rng(seed: int, dataset: str, episode: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(dataset.encode()), episode])


def _summarize(episodes: list[dict], num_classes: int) -> dict[str, Estimate]:
    """Mean and 95% CI over episodes of every summary score and every per-class score."""
    keys = summary_keys(episodes[0])
    out: dict = {key: mean_ci95([ep[key] for ep in episodes]) for key in keys}
    out.update({key: per_class_mean_ci95([ep[key] for ep in episodes], num_classes) for key in PER_CLASS})
    return estimates(out)


def evaluate_dataset(learner: MetaLearner, name: str, dataset: Dataset, num_classes: int, cfg: Any,
                     device: torch.device, seed: int, gallery: Optional[dict] = None, *,
                     validation: bool = False) -> dict:
    """:func:`dataset_result` as its ``eval.json`` entry; ``cfg``: ``EvalSettings``, or an ``EvalConfig``
    checked here."""
    return dataset_result(learner, name, dataset, num_classes, validate_eval(cfg), device, seed, gallery,
                          validation=validation).to_dict()


def dataset_result(learner: MetaLearner, name: str, dataset: Dataset, num_classes: int, settings: EvalSettings,
                   device: torch.device, seed: int, gallery: Optional[dict] = None, *,
                   validation: bool = False) -> DatasetResult:
    """Zero-shot and every k's episodes on one dataset (see the module docstring).

    ``gallery``: if given, filled with the picture material: ``indices`` (a few query images),
    ``zero_shot`` and ``adapted[k]`` predictions of them (episode 0). ``validation``: the dataset is
    a training set's validation tasks, not a held-out dataset (:func:`patch_mode`).
    """
    settings = patch_mode(dataset, name, settings, validation)
    n = len(dataset)
    cap = settings.max_images
    kw: dict = {"mode": settings.mode}
    if settings.mode == "slide":
        kw["window"], kw["stride"] = sliding_window(dataset, settings)
    ks = list(settings.episode_shots)
    largest = max(ks, default=0)
    if ks and n <= largest:
        raise ConfigError(f"held-out dataset {name!r} has {n} images: eval.shots={largest} leaves none to "
                          f"score; lower eval.shots")
    orders = [episode_rng(seed, name, e).permutation(n) for e in range(settings.episodes if ks else 0)]
    curve = list(settings.curve_steps)
    traced = settings.curve_shots if curve else ()  # the k whose episodes the curve follows
    metric = curve_metric(num_classes)

    zero_indices = list(range(n))[:cap]
    if gallery is not None:
        shown = query_of(orders[0], largest, cap) if orders else zero_indices
        gallery.update(indices=shown[: settings.pictures], zero_shot={}, adapted={}, shots=ks)
    capture = dict.fromkeys(gallery["indices"]) if gallery is not None else None
    zero = score(learner.model, dataset, zero_indices, num_classes, device, settings.batch_size,
                 learner.precision, capture=capture, **kw)
    if gallery is not None:
        missing = [i for i in gallery["indices"] if capture[i] is None]
        if missing:  # eval.max_images: episode 0's query images may lie outside the zero-shot ones
            extra = dict.fromkeys(missing)  # predicted for the picture only, not scored
            score(learner.model, dataset, missing, num_classes, device, settings.batch_size, learner.precision,
                  capture=extra, **kw)
            capture.update(extra)
        gallery["zero_shot"] = capture
    window, stride = (list(kw["window"]), list(kw["stride"])) if settings.mode == "slide" else (None, None)
    if not ks:
        return DatasetResult(n, len(zero_indices), Scores.from_dict(zero), window=window, stride=stride)

    steps = settings.adapt_steps if settings.adapt_steps is not None else learner.inner_steps
    lr = settings.adapt_lr if settings.adapt_lr is not None else default_adapt_lr(learner)
    episodes: dict[int, list[dict]] = {k: [] for k in ks}
    query_size = min(n - largest, cap or n)
    for e in episode_share(len(orders)):  # under torchrun each process runs every world_size-th episode
        order = orders[e]
        query = query_of(order, largest, cap)
        for k in ks:
            support = order[:k]
            images, masks = support_batch(dataset, support, settings, [seed, zlib.crc32(name.encode()), e, k])
            capture = dict.fromkeys(gallery["indices"]) if gallery is not None and e == 0 else None
            scorer = functools.partial(score, dataset=dataset, indices=query, num_classes=num_classes, device=device,
                                       batch_size=settings.batch_size, precision=learner.precision, **kw)
            s, points = adapt_and_score(learner, images.to(device), masks.to(device), steps, lr,
                                        curve if k in traced else [], scorer, capture)
            if capture is not None:
                gallery["adapted"][k] = capture
            record = {"support": [int(i) for i in support], "seed": [seed, zlib.crc32(name.encode()), e]}
            record.update({key: s[key] for key in (*summary_keys(s), *PER_CLASS)})
            record["image"] = {key: s["image"][key] for key in (*summary_keys(s), *PER_CLASS)}
            record["curve"] = {t: points[t][metric] for t in points}  # gathered with the episode it belongs to
            episodes[k].append((e, record))
    episodes = {k: [r for _, r in sorted(gather(episodes[k]), key=lambda er: er[0])] for k in ks}

    adapted = {}
    for k in ks:  # in the order of eval.shots: the first is eval.json's top-level "adapted"
        eps = episodes[k]
        adapted[k] = ShotResult(
            shots=k, episodes=len(eps), adapt_steps=steps, adapt_lr=lr, scored=query_size,
            dataset=_summarize(eps, num_classes), image=_summarize([ep["image"] for ep in eps], num_classes),
            per_episode=[Episode(ep["support"], ep["seed"], {key: ep[key] for key in summary_keys(ep)},
                                 {key: ep["image"][key] for key in summary_keys(ep)}) for ep in eps])
    points = {k: [ep["curve"] for ep in episodes[k]] for k in traced}
    return DatasetResult(n, len(zero_indices), Scores.from_dict(zero), adapted,
                         curve_summary(metric, points, curve) if curve else None, window, stride)


def adapt_and_score(learner: MetaLearner, images: torch.Tensor, masks: torch.Tensor, steps: int,
                    lr: Optional[float], curve: Sequence[int], scorer, capture: Optional[dict]
                    ) -> tuple[dict, dict[int, dict]]:
    """The scores after ``steps`` adaptation steps, and after every step count of ``curve``.

    With a curve, one adaptation runs to the largest count and ``scorer(model, capture=...)`` scores
    the model at each count on the way, the protocol's own ``steps`` included: one adaptation
    per (k, episode) serves the table and the curve. A wrapper's ``adapt`` (a new head set from
    the support) passes ``at``/``visit`` through, so its preparation holds for every count.
    """
    if not curve:
        adapted = learner.adapt(images, masks, steps=steps, lr=lr)
        return scorer(adapted, capture=capture), {}
    found: dict[int, dict] = {}

    def visit(t: int, model: nn.Module) -> None:
        found[t] = scorer(model, capture=capture if t == steps else None)

    learner.adapt(images, masks, steps=max(steps, curve[-1]), lr=lr, at=sorted({*curve, steps}), visit=visit)
    return found[steps], {t: found[t] for t in curve}


def curve_summary(metric: str, points: dict[int, list[dict[int, float]]], curve: Sequence[int]) -> Curve:
    """The adaptation curve: for every k followed and step count, the mean and 95% CI over episodes
    and each episode's value in episode order (episodes are seeded, so two checkpoints' values pair
    up for a paired comparison)."""
    def summary(values: list[float]) -> Estimate:
        m = mean_ci95(values)
        return Estimate(m["mean"], m["ci95"], per_episode=[float(v) for v in values])

    return Curve(metric, {k: {t: summary([ep[t] for ep in eps]) for t in curve} for k, eps in points.items()})


def default_adapt_lr(learner: MetaLearner) -> Optional[float]:
    """``eval.adapt_lr`` null: the learner's learned step sizes (None, Meta-SGD / LSLR) if any, else alpha."""
    return None if getattr(learner, "step_sizes", None) is not None else learner.inner_lr


def protocol(settings: EvalSettings, learner: MetaLearner, seed: int) -> dict:
    """The inputs that fix every number: recorded in ``eval.json`` next to the scores."""
    return {
        "mode": settings.mode, "shots": list(settings.shots), "episodes": settings.episodes, "seed": seed,
        "adapt_steps": settings.adapt_steps if settings.adapt_steps is not None else learner.inner_steps,
        "adapt_lr": settings.adapt_lr if settings.adapt_lr is not None else default_adapt_lr(learner),
        "batch_size": settings.batch_size, "max_images": settings.max_images, "window": settings.window,
        "stride": settings.stride,
        "episode_rng": "numpy.random.default_rng([seed, zlib.crc32(dataset), episode]).permutation(n): "
                       "support = first k, query = the rest after the largest k "
                       "(the next eval.max_images of them if set)",
        "reductions": "top-level scores: dataset reduction (one confusion matrix over all scored images); "
                      "'image': image reduction (per-image scores averaged)",
        "ci95": "1.96 * sample std / sqrt(episodes)",
        **({"curve_steps": list(settings.curve_steps)} if settings.curve_steps else {}),
    }


def evaluate_heldout(learner: MetaLearner, datasets: dict[str, Dataset], num_classes: int,
                     cfg: Any, device: torch.device, seed: int,
                     classes: Optional[Sequence[str]] = None, label: Optional[str] = None, *,
                     validation: bool = False) -> EvalResult:
    """Evaluate every dataset; returns the ``eval.json`` structure (pictures attached).

    ``cfg``: ``EvalSettings``, or an ``EvalConfig`` checked here. ``label`` names the model in the log
    lines (``[synth_4, random init] ...``) when it is not the one the run is about (the random-init
    baseline). ``validation``: the datasets are validation tasks (:func:`patch_mode`)."""
    settings = validate_eval(cfg)
    names = list(classes) if classes else [f"class {c}" for c in range(num_classes)]
    out = EvalResult({"classes": list(classes) if classes else None, "protocol": protocol(settings, learner, seed),
                      "datasets": {}})
    results: dict[str, DatasetResult] = {}
    for name, ds in datasets.items():
        t0 = time.perf_counter()
        gallery: Optional[dict] = {} if settings.pictures > 0 and is_main() else None  # episode 0 is rank 0's
        res = results[name] = dataset_result(learner, name, ds, num_classes, settings, device, seed, gallery,
                                             validation=validation)
        out.seconds[name] = time.perf_counter() - t0
        out["datasets"][name] = res.to_dict()
        if gallery is not None and gallery["indices"]:
            out.pictures[name] = render_gallery(name, ds, gallery, names, mode=settings.mode)
        z = res.zero_shot
        msg = f"[{name}{', ' + label if label else ''}] zero-shot mIoU {z.get('miou'):.3f} mF1 {z.get('mf1'):.3f}"
        for k, a in res.adapted.items():
            miou, mf1 = a.get("miou"), a.get("mf1")
            msg += f" | {k}-shot mIoU {miou.mean:.3f} +- {miou.ci95:.3f} mF1 {mf1.mean:.3f} +- {mf1.ci95:.3f}"
        log.info("%s (%.1fs)", msg, out.seconds[name])
        if res.curve is not None:
            log.info("[%s] adaptation curve, %s after steps: %s", name, res.curve.metric, "; ".join(
                f"{k}-shot " + " ".join(f"{t}:{v.mean:.3f}" for t, v in by_steps.items())
                for k, by_steps in res.curve.points.items()))
    if datasets:
        out["mean"] = dataset_means(results)
    return out
