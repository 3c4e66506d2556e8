"""The random-initialisation baseline: the held-out protocol once more, for the same model untrained.

"5-shot mIoU 0.264" alone does not say what training bought: the same five labelled images
also teach a network that never trained. So the final evaluation (``eval.baseline``, on by
default) scores a second model, the one ``metaseg-eval checkpoint=none`` evaluates: the same
``model`` config at a seeded random initialisation (``random_init`` of ``metaseg.engine.load``;
named encoder weights, if the config has them, load as they would before training). Everything
else is held fixed:

* the same episodes: supports, queries and support patches come from generators seeded by
  (seed, dataset, episode, k), never by the model (``metaseg.engine.evaluation.protocol``), so both
  models adapt on the same images and are scored on the same images;
* the same adaptation: the learner is built by the function that built the trained model's,
  from the same ``meta`` config, and run with the evaluation's own ``adapt_steps`` /
  ``adapt_lr`` (the tuned ones with ``eval.tune``). What training learned besides theta
  (Meta-SGD's or MAML++'s step sizes) is not carried over: the baseline adapts at their
  starting value, alpha;
* seeded: the weights are drawn right after ``seed_everything(seed)``, so one seed and config
  give the same numbers (on the CPU), and the whole baseline runs under ``rng_isolated``, so it
  moves no random stream of the run around it and the trained model's numbers do not change.

This is the weak control (did training help at all?); joint training (``meta=erm``) on the
same data is the strong one. Its whole cost is one more held-out evaluation (pictures and the
adaptation curve are not repeated for it), which is why ``eval.baseline=false`` exists: the
study (``scripts/study.py``) runs this baseline once per fold as its ``scratch`` arm.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from metaseg.engine.evaluation.protocol import evaluate_heldout
from metaseg.engine.evaluation.settings import EvalSettings, validate_eval
from metaseg.engine.evaluation.summary import RANDOM
from metaseg.engine.load import random_init
from metaseg.engine.state import rng_isolated
from metaseg.meta import MetaLearner

log = logging.getLogger(__name__)


def init_name(model_cfg: Any) -> str:
    """What the baseline starts from, in words: random, or random around named encoder weights."""
    weights = model_cfg.get("encoder_weights")
    return "random" if not weights else f"encoder weights {weights}, the rest random"


def baseline_eval_cfg(eval_cfg: Any) -> EvalSettings:
    """The evaluation's settings for the baseline: no pictures and no adaptation curve (the trained
    model's figures), everything that fixes the numbers as it is."""
    return validate_eval(eval_cfg).without_figures()


def evaluate_baseline(adaptation: Callable[[nn.Module], MetaLearner], model_cfg: Any,
                      datasets: Mapping[str, Dataset], num_classes: int, eval_cfg: Any, device: torch.device,
                      seed: int, classes: Optional[Sequence[str]] = None) -> dict:
    """The ``baseline`` entry of ``eval.json`` / ``metrics.json``: ``{"init", "seed", "datasets", "mean"}``,
    ``datasets`` and ``mean`` as the trained model's (zero-shot and every k, per-episode scores).

    ``adaptation`` builds the learner that adapts a model: the one the trained model's
    evaluation used, so that only the initialisation differs; ``eval_cfg`` is that evaluation's
    (tuned values included)."""
    t0 = time.perf_counter()
    with rng_isolated():
        model = random_init(model_cfg, num_classes, seed).to(device)
        result = evaluate_heldout(adaptation(model), datasets, num_classes, baseline_eval_cfg(eval_cfg), device,
                                  seed, classes, label=RANDOM)
    log.info("%s baseline: %.1fs (eval.baseline=false skips it)", RANDOM, time.perf_counter() - t0)
    return {"init": init_name(model_cfg), "seed": seed, "datasets": result["datasets"], "mean": result.get("mean")}
