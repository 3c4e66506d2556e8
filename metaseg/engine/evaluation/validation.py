"""Validation tasks: the held-out protocol run on the training datasets' reserved images.

``best.pt``, early stopping (``trainer.patience``) and ``eval.tune`` read these scores, never
the held-out datasets', so the held-out numbers a run reports were not used to pick anything.
The protocol is exactly :func:`metaseg.engine.evaluation.protocol.evaluate_heldout` (seeded episodes,
support = first k of a permutation, scored on the rest, adapted from a fresh copy of theta),
on ``Mix.val`` (:mod:`metaseg.data.splits`), with ``eval.val_episodes`` episodes (null:
``eval.episodes``) and no pictures. Its result sits under ``"val"`` of the run's evaluation
result, so ``trainer.best_metric=val.mean.adapted_miou`` (the default) names its mean.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Optional

import torch
from omegaconf import OmegaConf, open_dict
from torch.utils.data import Dataset

from metaseg.engine.evaluation.protocol import evaluate_heldout, shot_list
from metaseg.meta.maml import MetaLearner
from metaseg.utils.errors import ConfigError

log = logging.getLogger(__name__)
VAL_PREFIX = "val."


def validation_eval_cfg(eval_cfg: Any, *, adapt_lr: Optional[float] = None, adapt_steps: Optional[int] = None,
                        episodes: Optional[int] = None, shots: Optional[Any] = None) -> Any:
    """``eval_cfg`` as validation runs it: no pictures, ``eval.val_episodes`` episodes, the first k of
    ``eval.shots``, optional overrides."""
    cfg = copy.deepcopy(eval_cfg) if OmegaConf.is_config(eval_cfg) else OmegaConf.create(dict(eval_cfg))
    with open_dict(cfg):
        cfg.pictures = 0
        cfg.mode = "resize"  # data.patches: slide instead (evaluate.patch_mode)
        cfg.validation = True
        val_episodes = cfg.get("val_episodes")
        cfg.episodes = int(episodes if episodes is not None else
                           (val_episodes if val_episodes is not None else cfg.episodes))
        # the first k of eval.shots: the one best.pt (mean.adapted_*) and eval.tune read; a small
        # training site need not keep images for the held-out protocol's largest k
        cfg.shots = shots if shots is not None else shot_list(cfg)[:1]
        if adapt_lr is not None:
            cfg.adapt_lr = float(adapt_lr)
        if adapt_steps is not None:
            cfg.adapt_steps = int(adapt_steps)
    return cfg


def evaluate_validation(learner: MetaLearner, val: dict[str, Dataset], num_classes: int, eval_cfg: Any,
                        device: torch.device, seed: int, classes=None, **overrides: Any) -> dict:
    """Validation-task scores of ``learner`` (the ``eval.json`` structure, without pictures)."""
    result = evaluate_heldout(learner, val, num_classes, validation_eval_cfg(eval_cfg, **overrides), device, seed,
                              classes)
    return dict(result)


def check_selection_metric(metric: str, val: dict[str, Dataset], heldout: dict[str, Dataset]) -> None:
    """``trainer.best_metric`` must be computable, and should not select on held-out scores."""
    if metric.startswith(VAL_PREFIX) and not val:
        raise ConfigError(f"trainer.best_metric={metric!r} reads validation tasks, but no training dataset reserves "
                          f"validation images: set data.val_fraction>0 (or add 'val' rows to splits.csv), or "
                          f"trainer.best_metric=mean.adapted_miou to select on held-out scores")
    if not metric.startswith(VAL_PREFIX) and heldout:
        log.warning("trainer.best_metric=%s selects best.pt on the held-out datasets: their scores are then "
                    "optimistic; val.%s selects on validation tasks", metric, metric)


def log_validation(writer, result: dict, step: int) -> None:
    """Validation means to tensorboard (``val/...``)."""
    for key, value in (result.get("mean") or {}).items():
        if isinstance(value, float):
            writer.add_scalar(f"val/{key}", value, step)
