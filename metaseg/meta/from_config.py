"""The algorithm a ``MetaConfig`` describes: the one way training, evaluation and the scripts build one.

``make_learner`` turns a ``MetaConfig`` into the algorithm object (``meta.algorithm`` names a
class of :data:`metaseg.meta.ALGORITHMS`; the class says which of the config's keys it takes,
``options``), with the learned step sizes and the outer-loop settings; for training it also
asks the model, once, whether it can be differentiated twice. ``validate_meta`` rejects option
combinations that would silently do nothing (a multi-step loss for Reptile, learned step sizes
for ERM, ...), from the facts each algorithm declares on its class, never from its name.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from torch import nn

from metaseg.meta import ALGORITHMS
from metaseg.meta.base import SCHEDULES, OuterSettings
from metaseg.meta.capability import FIX, SecondOrderError, second_order_problem
from metaseg.meta.learner import MetaLearner
from metaseg.meta.losses import loss_fn
from metaseg.meta.metasgd import StepSizes
from metaseg.meta.precision import Precision
from metaseg.utils.errors import ConfigError

log = logging.getLogger(__name__)
GRANULARITIES = ("tensor", "element")
QUERY_FROM = ("same", "other")


def validate_meta(m: Any) -> None:
    """Allowed values and combinations of the algorithm-zoo keys of ``meta``."""
    if m.algorithm not in ALGORITHMS:
        raise ConfigError(f"meta.algorithm={m.algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    for key, value, allowed in (("meta.inner_lr_granularity", m.inner_lr_granularity, GRANULARITIES),
                                ("meta.outer_lr_schedule", m.outer_lr_schedule, SCHEDULES),
                                ("meta.query_from", m.query_from, QUERY_FROM)):
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    for key, value, low in (("meta.msl_anneal_steps", m.msl_anneal_steps, 1),
                            ("meta.first_order_until", m.first_order_until, 0)):
        if value < low:
            raise ConfigError(f"{key}={value} must be >= {low}")
    if m.clip_grad is not None and not m.clip_grad > 0:
        raise ConfigError(f"meta.clip_grad={m.clip_grad} must be > 0 (or null for no clipping)")
    if not 0 <= m.outer_lr_min <= m.outer_lr:
        raise ConfigError(f"meta.outer_lr_min={m.outer_lr_min} must lie in [0, meta.outer_lr={m.outer_lr}]")
    if m.gamma < 0:
        raise ConfigError(f"meta.gamma={m.gamma} must be >= 0")
    name, algo = m.algorithm, ALGORITHMS[m.algorithm]  # each algorithm declares its facts (metaseg.meta.learner)
    if not algo.has_meta_gradient:
        with_gradient = [n for n, a in ALGORITHMS.items() if a.has_meta_gradient]
        for key, on in (("multi_step_loss", m.multi_step_loss), ("learn_inner_lr", m.learn_inner_lr),
                        ("first_order_until", m.first_order_until > 0)):
            if on:
                raise ConfigError(f"meta.{key} needs a meta-gradient through the inner loop, which "
                                  f"meta.algorithm={name} does not have; use {', '.join(with_gradient)}")
    first_order = m.first_order or algo.first_order_only
    if m.first_order_until > 0 and first_order:
        raise ConfigError(f"meta.first_order_until={m.first_order_until} anneals first to second order, but "
                          f"meta.algorithm={name} (first_order={m.first_order}) is first order throughout")
    if m.inner_lr_per_step and not (m.learn_inner_lr or algo.learns_step_sizes):
        learners = [n for n, a in ALGORITHMS.items() if a.learns_step_sizes]
        raise ConfigError("meta.inner_lr_per_step=true needs learned step sizes: set meta.learn_inner_lr=true "
                          f"(or meta={' / meta='.join(learners)})")
    if m.checkpoint_inner and (first_order or algo.keeps_support_graph):
        raise ConfigError(f"meta.checkpoint_inner=true saves memory of second-order inner steps, which "
                          f"meta.algorithm={name} (first_order={m.first_order}) does not take (MLDG keeps its first "
                          f"support graph); set meta.checkpoint_inner=false")
    if m.inner_steps < algo.min_inner_steps:
        raise ConfigError(f"meta.inner_steps={m.inner_steps}: meta.algorithm={name} needs at least "
                          f"{algo.min_inner_steps} inner step (its D_i loss is the first)")


def make_learner(model: nn.Module, meta_cfg: Any, precision: Precision, *, max_steps: int = 1,
                 model_cfg: Optional[Any] = None) -> MetaLearner:
    """The algorithm a ``MetaConfig`` describes, around ``model``.

    With ``model_cfg`` (training), a model that cannot be differentiated twice stops here
    with the fix, or trains first order with a warning when ``meta.second_order_fallback``.
    """
    m = meta_cfg
    validate_meta(m)
    kwargs: dict[str, Any] = dict(
        inner_lr=m.inner_lr, inner_steps=m.inner_steps, first_order=m.first_order, precision=precision,
        backend=m.backend, loss=loss_fn(m), inner_params=list(m.inner_params) or None,
        outer=OuterSettings(lr=m.outer_lr, meta_batch=m.meta_batch, schedule=m.outer_lr_schedule,
                            lr_min=m.outer_lr_min, max_steps=max_steps, clip_grad=m.clip_grad))
    per_element, per_step = m.inner_lr_granularity == "element", bool(m.inner_lr_per_step)
    algo = ALGORITHMS[m.algorithm]
    learner = algo(model, **kwargs, **algo.options(m))
    if m.learn_inner_lr and learner.step_sizes is None:  # MAML++ LSLR on maml / anil / mldg / fomaml
        params = dict(model.named_parameters())
        learner.step_sizes = StepSizes({n: params[n] for n in learner.inner_names}, m.inner_lr,
                                       per_element=per_element, steps=max(m.inner_steps, 1) if per_step else 1)
    if model_cfg is not None and not algo.first_order_only and not m.first_order:
        _check_second_order(learner, m, model_cfg)
    return learner


def _check_second_order(learner: MetaLearner, m: Any, model_cfg: Any) -> None:
    probe = second_order_problem(learner.model, learner.loss, learner.inner_names,
                                 in_channels=model_cfg.in_channels)
    if probe.unused:
        log.info("%d parameters get no inner gradient (the forward pass does not use them); they stay at theta "
                 "in the inner loop (first: %s)", len(probe.unused), probe.unused[0])
    if probe.problem is None:
        return
    what = f"model.encoder={model_cfg.encoder!r} ({model_cfg.arch}) cannot be meta-trained second order"
    if not m.second_order_fallback:
        raise SecondOrderError(f"{what}: {probe.problem}; {FIX}")
    log.warning("%s: %s; meta.second_order_fallback=true: training first order instead", what, probe.problem)
    learner.train_first_order()
