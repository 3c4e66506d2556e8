"""Objects built from config sections that both training and evaluation need."""

from __future__ import annotations

from typing import Any

from torch import nn

from metaseg.meta.maml import MetaLearner
from metaseg.meta.precision import Precision


def make_learner(model: nn.Module, meta_cfg: Any, precision: Precision) -> MetaLearner:
    """The ``MetaLearner`` a ``MetaConfig`` describes, around ``model``."""
    return MetaLearner(model, inner_lr=meta_cfg.inner_lr, inner_steps=meta_cfg.inner_steps,
                       first_order=meta_cfg.first_order, precision=precision)
