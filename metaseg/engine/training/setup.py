"""A training run's set-up: everything the outer loop works on, built from the config in one order.

``metaseg-train`` (``engine/training/trainer.py``), the step-cost measurement of the benchmark
scripts (``scripts/step_cost.py``) and ``scripts/probe_meta_gradient.py`` all start here, so a
benchmark times and a probe differentiates the very learner a run trains. The order below is
part of what a seed means: the model's weights are the first draw after ``seed_everything``,
so reordering the construction changes every number a run reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from metaseg.data.mix import Mix, build_mix
from metaseg.data.splits import check_validation_sizes
from metaseg.data.tasks import TaskSampler
from metaseg.engine import distributed
from metaseg.engine.evaluation.protocol import check_heldout_sizes
from metaseg.engine.evaluation.settings import validate_eval
from metaseg.engine.evaluation.validation import check_selection_metric
from metaseg.engine.training.init_from import initialise
from metaseg.meta import MetaLearner
from metaseg.meta.from_config import make_learner
from metaseg.meta.precision import Precision
from metaseg.models.factory import build_model
from metaseg.utils.runtime import seed_everything


@dataclass
class Run:
    """What the outer loop of one process works on."""

    mix: Mix  # training datasets, their validation split (Mix.val, for best.pt) and the held-out ones
    sampler: TaskSampler  # this process's share of every meta-batch
    model: nn.Module  # on the device
    learner: MetaLearner
    optimizer: torch.optim.Optimizer
    scaler: Any  # the loss scaler (fp16), a no-op otherwise
    precision: Precision


def build_run(cfg: Any, ctx: Optional[distributed.Context] = None) -> Run:
    """Seed, then build ``cfg``'s datasets, task sampler, model (``meta.init_from``'s weights, if any),
    learner, optimizer and loss scaler for the process ``ctx`` (None: one process on the CPU)."""
    ctx = ctx if ctx is not None else distributed.Context()
    seed_everything(cfg.seed)
    meta = cfg.meta
    precision = Precision(cfg.trainer.precision, ctx.device.type)
    mix = build_mix(cfg.data, validation=True)  # Mix.val: validation tasks (engine/evaluation/validation.py)
    check_selection_metric(cfg.trainer.best_metric, mix.val, mix.heldout)
    settings = validate_eval(cfg.eval)
    if settings.episodes >= 1:
        check_validation_sizes(mix.val, list(settings.shots[:1]))  # validation adapts with the first k only
    sampler = TaskSampler(mix.train, mix.weights, meta.shots, meta.query, seed=cfg.seed, query_from=meta.query_from)
    sampler.shard(ctx.rank, ctx.world_size)  # same stream on every rank, each loads its slice
    check_heldout_sizes(mix.heldout, settings)
    model = build_model(cfg.model, mix.num_classes)
    if meta.init_from:  # before resume, which overwrites it with the run's own state
        initialise(model, meta.init_from, mix.classes, strict=cfg.model.strict_weights)
    model = model.to(ctx.device)
    learner = make_learner(model, meta, precision, max_steps=cfg.trainer.max_steps, model_cfg=cfg.model)
    if ctx.world_size > 1:
        learner.grad_sync = distributed.GradSync()
    return Run(mix, sampler, model, learner, learner.make_optimizer(), precision.grad_scaler(), precision)
