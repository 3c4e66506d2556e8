"""The held-out protocol: zero-shot, then few-shot adaptation scored on the rest.

For each held-out dataset: score every image with theta as it is (zero-shot). Then for each
of ``eval.episodes`` episodes, draw ``eval.shots`` support images with a generator seeded by
(seed, dataset, episode), adapt a copy of theta on them with the inner loop, and score the
remaining images. Every episode starts from the same theta. Scores are confusion-matrix
(dataset-reduction) mIoU and mean F1; adapted scores are the mean and 95% interval over
episodes.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from metaseg.data.tasks import collate
from metaseg.meta.maml import IGNORE_INDEX, MetaLearner
from metaseg.metrics import ConfusionMatrix, mean_ci95
from metaseg.utils.errors import ConfigError

log = logging.getLogger(__name__)
SUMMARY_KEYS = ("miou", "mf1", "pixel_acc")


@torch.inference_mode()
def score(model: nn.Module, dataset: Dataset, indices: Sequence[int], num_classes: int,
          device: torch.device, batch_size: int, precision) -> dict:
    model.eval()
    cm = ConfusionMatrix(num_classes, IGNORE_INDEX, device=device)
    for start in range(0, len(indices), batch_size):
        images, masks = collate(dataset, indices[start : start + batch_size])
        with precision.autocast():
            logits = model(images.to(device))
        cm.update(logits.argmax(1), masks.to(device))
    return cm.compute()


def episode_rng(seed: int, dataset: str, episode: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(dataset.encode()), episode])


def evaluate_dataset(learner: MetaLearner, name: str, dataset: Dataset, num_classes: int,
                     cfg: Any, device: torch.device, seed: int) -> dict:
    n = len(dataset)
    cap = cfg.max_images
    zero = score(learner.model, dataset, list(range(n))[:cap], num_classes, device,
                 cfg.batch_size, learner.precision)
    result = {"images": n, "zero_shot": zero}
    if cfg.shots < 1 or cfg.episodes < 1:
        return result
    if n <= cfg.shots:
        raise ConfigError(f"held-out dataset {name!r} has {n} images: eval.shots={cfg.shots} leaves none to score; lower eval.shots")
    episodes = []
    for e in range(cfg.episodes):
        order = episode_rng(seed, name, e).permutation(n)
        support, rest = order[: cfg.shots], sorted(order[cfg.shots :].tolist())[:cap]
        images, masks = collate(dataset, support)
        adapted = learner.adapt(images.to(device), masks.to(device), steps=cfg.adapt_steps, lr=cfg.adapt_lr)
        scores = score(adapted, dataset, rest, num_classes, device, cfg.batch_size, learner.precision)
        scores["support"] = [int(i) for i in support]
        episodes.append(scores)
        del adapted
    adapted_summary = {"shots": cfg.shots, "episodes": cfg.episodes,
                       "adapt_steps": cfg.adapt_steps if cfg.adapt_steps is not None else learner.inner_steps,
                       "adapt_lr": cfg.adapt_lr if cfg.adapt_lr is not None else learner.inner_lr}
    for key in SUMMARY_KEYS:
        adapted_summary[key] = mean_ci95([ep[key] for ep in episodes])
    adapted_summary["per_episode"] = [{k: ep[k] for k in (*SUMMARY_KEYS, "support")} for ep in episodes]
    result["adapted"] = adapted_summary
    return result


def evaluate_heldout(learner: MetaLearner, datasets: dict[str, Dataset], num_classes: int,
                     cfg: Any, device: torch.device, seed: int,
                     classes: Optional[Sequence[str]] = None) -> dict:
    """Evaluate every held-out dataset; returns the ``eval.json`` structure."""
    out: dict = {"classes": list(classes) if classes else None, "datasets": {}}
    for name, ds in datasets.items():
        res = evaluate_dataset(learner, name, ds, num_classes, cfg, device, seed)
        out["datasets"][name] = res
        z = res["zero_shot"]
        msg = f"[{name}] zero-shot mIoU {z['miou']:.3f} mF1 {z['mf1']:.3f}"
        if "adapted" in res:
            a = res["adapted"]
            msg += (f" | {a['shots']}-shot mIoU {a['miou']['mean']:.3f} +- {a['miou']['ci95']:.3f}"
                    f" mF1 {a['mf1']['mean']:.3f} +- {a['mf1']['ci95']:.3f}")
        log.info(msg)
    if datasets:
        per = out["datasets"].values()
        out["mean"] = {"zero_shot_miou": float(np.mean([r["zero_shot"]["miou"] for r in per]))}
        if all("adapted" in r for r in per):
            out["mean"]["adapted_miou"] = float(np.mean([r["adapted"]["miou"]["mean"] for r in per]))
            out["mean"]["adapted_mf1"] = float(np.mean([r["adapted"]["mf1"]["mean"] for r in per]))
    return out

