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

import logging
from typing import Any

import torch
from torch.utils.data import Dataset

from metaseg.engine.evaluation.protocol import evaluate_heldout
from metaseg.engine.evaluation.settings import validate_eval
from metaseg.meta import MetaLearner
from metaseg.utils.errors import ConfigError

log = logging.getLogger(__name__)
VAL_PREFIX = "val."


def evaluate_validation(learner: MetaLearner, val: dict[str, Dataset], num_classes: int, eval_cfg: Any,
                        device: torch.device, seed: int, classes=None, **overrides: Any) -> dict:
    """Validation-task scores of ``learner`` (the ``eval.json`` structure, without pictures).

    ``eval_cfg``: the evaluation's ``EvalSettings`` (or an ``EvalConfig``, checked here), scored as
    :meth:`~metaseg.engine.evaluation.settings.EvalSettings.for_validation` says, with its
    ``overrides`` (``adapt_lr``, ``adapt_steps``, ``episodes``, ``shots``)."""
    settings = validate_eval(eval_cfg).for_validation(**overrides)
    return dict(evaluate_heldout(learner, val, num_classes, settings, device, seed, classes, validation=True))


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
