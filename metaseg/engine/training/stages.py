"""The two-stage recipe in one run: joint training (``pretrain``), then meta-training from it.

With ``pretrain.steps=N`` a run first trains ``pretrain.algorithm`` (``erm`` by default: the
same model, mix, tasks and hyper-parameters, joint training) for N outer steps in
``<run dir>/pretrain/``, then meta-trains ``meta.algorithm`` for ``trainer.max_steps`` steps
starting from that stage's ``pretrain.checkpoint`` (``best``: selected on validation tasks,
or ``last``), exactly as ``meta.init_from`` would. The total is N + ``trainer.max_steps``
outer steps; ``experiment=two_stage`` splits a single-stage arm's 200 steps 100 + 100, and
``budget.json`` adds both stages' images and seconds (:mod:`metaseg.engine.training.budget`).

A resumed run (``trainer.resume=auto``) skips a finished first stage and resumes an
unfinished one.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Callable

from omegaconf import open_dict

from metaseg.engine.checkpoint import BEST, LAST, checkpoint_dir, load_checkpoint
from metaseg.utils.errors import ConfigError

log = logging.getLogger(__name__)
STAGE_DIR = "pretrain"
CHOICES = {"best": BEST, "last": LAST}


def stage_config(cfg: Any) -> Any:
    """The first stage's config: ``pretrain.algorithm`` for ``pretrain.steps`` steps, no further stage."""
    p = cfg.pretrain
    stage = copy.deepcopy(cfg)
    with open_dict(stage):
        stage.pretrain.steps = 0
        stage.meta.algorithm = p.algorithm
        stage.meta.first_order = False
        stage.trainer.max_steps = int(p.steps)
        stage.trainer.eval_every = min(int(cfg.trainer.eval_every), int(p.steps))
        stage.trainer.ckpt_every = min(int(cfg.trainer.ckpt_every), int(p.steps))
        stage.trainer.resume = "auto" if cfg.trainer.resume else None
        stage.trainer.patience = None
        stage.eval.tune = False
        stage.eval.baseline = False  # the second stage's final evaluation sets the baseline beside the result
    return stage


def pretrain_stage(cfg: Any, run_dir: Path, train_fn: Callable[[Any, Path], dict]) -> Any:
    """Run the first stage if ``pretrain.steps`` asks for one; return the config of the second."""
    p = cfg.get("pretrain")
    if p is None or not p.steps:
        return cfg
    if p.steps < 0:
        raise ConfigError(f"pretrain.steps={p.steps} must be >= 0")
    if p.checkpoint not in CHOICES:
        raise ConfigError(f"pretrain.checkpoint={p.checkpoint!r} is not one of {', '.join(CHOICES)}")
    stage_dir = Path(run_dir) / STAGE_DIR
    last = checkpoint_dir(stage_dir) / LAST
    done = last.is_file() and int(load_checkpoint(last).get("step", -1)) >= int(p.steps)
    if done:
        log.info("pretrain: %s is finished (step %d), reusing it", stage_dir, int(p.steps))
    else:
        log.info("pretrain: %s for %d steps in %s, then %s from it", p.algorithm, p.steps, stage_dir,
                 cfg.meta.algorithm)
        train_fn(stage_config(cfg), stage_dir)
    chosen = checkpoint_dir(stage_dir) / CHOICES[p.checkpoint]
    if not chosen.is_file():  # no best.pt (no metric could be read): the final weights
        chosen = last
    second = copy.deepcopy(cfg)
    with open_dict(second):
        second.meta.init_from = str(chosen)
    return second
