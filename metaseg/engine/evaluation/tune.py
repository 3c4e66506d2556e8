"""``eval.tune``: pick the adaptation step size and step count per checkpoint, on validation tasks.

A single fixed ``(adapt_lr, adapt_steps)`` favours whichever arm happens to suit it (a
jointly trained model often wants more, smaller steps than a MAML initialisation). With
``eval.tune=true`` every checkpoint, whatever its algorithm (maml, fomaml, anil, metasgd,
erm, or ``checkpoint=none``), goes through the same selection:

1. for every ``adapt_steps`` in ``eval.tune_steps`` and ``adapt_lr`` in ``eval.tune_lrs``
   (that order), score the first k of ``eval.shots`` on the validation tasks of the training
   datasets (:mod:`metaseg.engine.evaluation.validation`; ``eval.tune_episodes`` episodes each); a
   learner with learned step sizes (Meta-SGD, MAML++ LSLR) also tries them (``adapt_lr``
   null, recorded as such), first, since a fixed ``adapt_lr`` replaces them;
2. choose the grid point with the highest mean adapted score (``eval.tune_metric``) over the
   validation datasets, or those ``eval.tune_datasets`` names (the first one on a tie; NaN
   never wins);
3. evaluate the held-out datasets with that choice.

The grid, every score and the choice go into ``eval.json`` (or ``metrics.json``) under
``"tune"``; ``protocol.adapt_lr`` / ``adapt_steps`` are the chosen values. No held-out image
is looked at before the choice is made.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional, Sequence

import torch
from torch.utils.data import Dataset

from metaseg.data.splits import check_validation_sizes
from metaseg.engine.evaluation.settings import EvalSettings, validate_eval
from metaseg.engine.evaluation.validation import evaluate_validation
from metaseg.meta import MetaLearner
from metaseg.utils.errors import ConfigError

log = logging.getLogger(__name__)


def tune_grid(eval_cfg: Any) -> list[tuple[float, int]]:
    """``(adapt_lr, adapt_steps)`` points in the order they are tried: steps outer, lrs inner."""
    return validate_eval(eval_cfg).tune_grid()


def tune_episodes(settings: EvalSettings) -> int:
    """Episodes per validation dataset and grid point: ``eval.tune_episodes``, else ``eval.val_episodes``,
    else ``eval.episodes``."""
    for value in (settings.tune_episodes, settings.val_episodes, settings.episodes):
        if value is not None:
            return int(value)
    return 1


def tune_adaptation(learner: MetaLearner, val: dict[str, Dataset], num_classes: int, eval_cfg: Any,
                    device: torch.device, seed: int, classes: Optional[Sequence[str]] = None) -> dict:
    """Score every grid point on the validation tasks; returns the record with ``chosen``.

    ``eval_cfg``: the evaluation's ``EvalSettings`` (or an ``EvalConfig``, checked here)."""
    settings = validate_eval(eval_cfg)
    if not val:
        raise ConfigError("eval.tune=true needs validation tasks, but no training dataset reserves validation "
                          "images: set data.val_fraction>0 (or add 'val' rows to splits.csv)")
    ks = settings.shots
    if not ks:
        raise ConfigError(f"eval.tune=true needs a k to tune for, but eval.shots={list(ks) or 0}")
    k, episodes = ks[0], tune_episodes(settings)
    if episodes < 1:
        raise ConfigError(f"eval.tune_episodes={episodes} must be >= 1")
    val = tuning_datasets(val, settings.tune_datasets)
    check_validation_sizes(val, [k])
    rows = []
    grid: list[tuple[Optional[float], int]] = list(settings.tune_grid())
    if getattr(learner, "step_sizes", None) is not None:  # learned step sizes compete as one more "lr"
        grid = [(None, s) for s in dict.fromkeys(s for _, s in grid)] + grid
    metric = settings.tune_metric
    for lr, steps in grid:
        res = evaluate_validation(learner, val, num_classes, settings.with_adaptation(lr, steps), device, seed,
                                  classes, episodes=episodes, shots=k)
        if f"adapted_{metric}" not in res["mean"]:
            raise ConfigError(f"eval.tune_metric={metric} is a foreground score of binary label spaces; this mix has "
                              f"{num_classes} classes: use eval.tune_metric=miou")
        rows.append({"adapt_lr": lr, "adapt_steps": steps, "score": float(res["mean"][f"adapted_{metric}"])})
        log.info("tune: adapt_lr %s, adapt_steps %d: validation %d-shot " + metric + " %.4f",
                 "learned" if lr is None else lr, steps, k, rows[-1]["score"])
    best = max(rows, key=lambda r: -math.inf if math.isnan(r["score"]) else r["score"])  # first on a tie
    chosen = {"adapt_lr": best["adapt_lr"], "adapt_steps": best["adapt_steps"]}
    log.info("tune: chose adapt_lr %s, adapt_steps %d (validation " + metric + " %.4f)", chosen["adapt_lr"],
             chosen["adapt_steps"], best["score"])
    return {"metric": f"validation mean.adapted_{metric} at {k} shots", "shots": k, "episodes": episodes,
            "datasets": list(val), "grid": rows, "chosen": chosen, "score": best["score"]}


def tuning_datasets(val: dict[str, Dataset], names: Optional[Sequence[str]]) -> dict[str, Dataset]:
    """The validation datasets ``eval.tune_datasets`` names (null: all of them).

    One mean over unlike structures lets the majority decide: with lesions and membranes in
    the mix, the step size that helps them can erase thin vessels. Naming the validation sets
    of the structure a user is about to segment (the other retina sites, for a new retina
    site) tunes for that structure. A name may be a dataset or one of its parts
    (``NAME/CLASS`` in a ``binary_class`` mix); held-out datasets have no validation tasks and
    can never be named.
    """
    if not names:
        return val
    picked: dict[str, Dataset] = {}
    for name in names:
        hits = {k: v for k, v in val.items() if k == name or k.startswith(f"{name}/")}
        if not hits:
            raise ConfigError(f"eval.tune_datasets: {name!r} has no validation tasks (validation datasets: "
                              f"{', '.join(val)}); held-out datasets can never be tuned on")
        picked.update(hits)
    return picked


def tuned_settings(eval_cfg: Any, tuning: dict) -> EvalSettings:
    """The evaluation's settings with the chosen ``adapt_lr`` (null: the learned step sizes) and ``adapt_steps``."""
    chosen = tuning["chosen"]
    return validate_eval(eval_cfg).with_adaptation(chosen["adapt_lr"], chosen["adapt_steps"])
