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

import copy
import logging
import math
from typing import Any, Optional, Sequence

import torch
from omegaconf import OmegaConf, open_dict
from torch.utils.data import Dataset

from metaseg.data.splits import check_validation_sizes
from metaseg.engine.evaluation.protocol import shot_list
from metaseg.engine.evaluation.validation import evaluate_validation
from metaseg.meta.maml import MetaLearner
from metaseg.utils.errors import ConfigError

log = logging.getLogger(__name__)
TUNE_METRICS = ("miou", "mf1", "fg_dice", "fg_iou")


def tune_grid(eval_cfg: Any) -> list[tuple[float, int]]:
    """``(adapt_lr, adapt_steps)`` points in the order they are tried: steps outer, lrs inner."""
    lrs, steps = list(eval_cfg.tune_lrs), list(eval_cfg.tune_steps)
    if not lrs or not steps:
        raise ConfigError(f"eval.tune needs eval.tune_lrs and eval.tune_steps to list values, got {lrs} and {steps}")
    if any(not float(lr) > 0 for lr in lrs):
        raise ConfigError(f"eval.tune_lrs={lrs} must all be > 0")
    if any(int(s) < 0 for s in steps):
        raise ConfigError(f"eval.tune_steps={steps} must all be >= 0")
    return [(float(lr), int(s)) for s in steps for lr in lrs]


def tune_episodes(eval_cfg: Any) -> int:
    for key in ("tune_episodes", "val_episodes", "episodes"):
        value = eval_cfg.get(key)
        if value is not None:
            return int(value)
    return 1


def tune_adaptation(learner: MetaLearner, val: dict[str, Dataset], num_classes: int, eval_cfg: Any,
                    device: torch.device, seed: int, classes: Optional[Sequence[str]] = None) -> dict:
    """Score every grid point on the validation tasks; returns the record with ``chosen``."""
    if not val:
        raise ConfigError("eval.tune=true needs validation tasks, but no training dataset reserves validation "
                          "images: set data.val_fraction>0 (or add 'val' rows to splits.csv)")
    ks = shot_list(eval_cfg)
    if not ks:
        raise ConfigError(f"eval.tune=true needs a k to tune for, but eval.shots={eval_cfg.shots}")
    k, episodes = ks[0], tune_episodes(eval_cfg)
    if episodes < 1:
        raise ConfigError(f"eval.tune_episodes={episodes} must be >= 1")
    val = tuning_datasets(val, eval_cfg.get("tune_datasets"))
    check_validation_sizes(val, [k])
    rows = []
    grid: list[tuple[Optional[float], int]] = list(tune_grid(eval_cfg))
    if getattr(learner, "step_sizes", None) is not None:  # learned step sizes compete as one more "lr"
        grid = [(None, s) for s in dict.fromkeys(s for _, s in grid)] + grid
    metric = str(eval_cfg.get("tune_metric", "miou"))
    if metric not in TUNE_METRICS:
        raise ConfigError(f"eval.tune_metric={metric!r} is not one of {', '.join(TUNE_METRICS)}")
    for lr, steps in grid:
        res = evaluate_validation(learner, val, num_classes, tuned_eval_cfg(eval_cfg, {"chosen": {
            "adapt_lr": lr, "adapt_steps": steps}}), device, seed, classes, episodes=episodes, shots=k)
        if f"adapted_{metric}" not in res["mean"]:
            raise ConfigError(f"eval.tune_metric={metric} is a foreground score of binary label spaces; this mix has "
                              f"{num_classes} classes: use eval.tune_metric=miou")
        rows.append({"adapt_lr": lr, "adapt_steps": steps, "score": float(res["mean"][f"adapted_{metric}"])})
        log.info("tune: adapt_lr %s, adapt_steps %d: validation %d-shot " + metric + " %.4f", "learned" if lr is None else lr,
                 steps, k, rows[-1]["score"])
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


def tuned_eval_cfg(eval_cfg: Any, tuning: dict) -> Any:
    """``eval_cfg`` with the chosen ``adapt_lr`` (null: the learned step sizes) and ``adapt_steps``."""
    cfg = copy.deepcopy(eval_cfg) if OmegaConf.is_config(eval_cfg) else OmegaConf.create(dict(eval_cfg))
    lr = tuning["chosen"]["adapt_lr"]
    with open_dict(cfg):
        cfg.adapt_lr = None if lr is None else float(lr)
        cfg.adapt_steps = int(tuning["chosen"]["adapt_steps"])
    return cfg
