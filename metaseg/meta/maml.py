"""MAML: the outer loss of one task through the inner loop; and the MAML++ options.

One task is a support batch and a query batch. The inner loop takes ``inner_steps`` (K)
SGD steps at ``inner_lr`` (alpha) on the support loss, starting from the model's own
parameters theta; the outer loss is the query loss at the adapted weights phi_K. Its
``backward()`` leaves d L_query(phi_K) / d theta in ``theta.grad``, the MAML meta-gradient,
which the outer step averages over tasks and hands to the outer optimizer (beta).

Second order (default) differentiates through the K steps. First order (FOMAML) takes the
inner gradients without a graph, so the query gradient at phi_K reaches theta unchanged.

Options, all off by default, each one keyword (and one ``meta.*`` key):

* ``inner_params``: module-name patterns adapted in the inner loop; the rest stay theta
  there and are still meta-learned (ANIL, :mod:`metaseg.meta.anil`);
* ``step_sizes``: learned inner step sizes, per tensor or per element, optionally per
  inner step (Meta-SGD, MAML++'s LSLR, :mod:`metaseg.meta.metasgd`);
* ``multi_step_loss``: the query loss after every inner step with annealed weights;
  ``first_order_until``: first order for the first N outer steps (MAML++,
  :mod:`metaseg.meta.mamlpp`). Both follow the outer step number ``step``;
* ``checkpoint_inner``: second-order inner steps recomputed in the outer backward instead of
  stored (less memory, one more forward and inner backward per step).

The inner loop and adaptation are every learner's (:mod:`metaseg.meta.learner`). FOMAML,
ANIL, Meta-SGD, MLDG and iMAML are MAML with other settings or another objective; Reptile and
ERM are not MAML and build on :class:`metaseg.meta.learner.MetaLearner` directly.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
from torch import nn

from metaseg.meta.inner import Params
from metaseg.meta.learner import Batch, MetaLearner
from metaseg.meta.mamlpp import first_order_at, multi_step_weights


class MAML(MetaLearner):
    """Model-agnostic meta-learning: the query loss after the inner loop, differentiated through it.

    ``outer_loss(support, query)`` returns one task's query loss after adaptation; its
    ``backward()`` leaves the meta-gradient in theta. ``adapt`` and the outer step are every
    learner's (:class:`metaseg.meta.learner.MetaLearner`, :class:`metaseg.meta.base.Algorithm`).
    """

    name = "maml"
    has_meta_gradient = True

    @classmethod
    def options(cls, m: Any) -> dict:
        """The MAML++ options, which every MAML variant takes from a ``MetaConfig``."""
        return {"multi_step_loss": m.multi_step_loss, "msl_anneal_steps": m.msl_anneal_steps,
                "first_order_until": m.first_order_until, "checkpoint_inner": m.checkpoint_inner}

    def __init__(self, model: nn.Module, *, multi_step_loss: bool = False, msl_anneal_steps: int = 100,
                 first_order_until: int = 0, checkpoint_inner: bool = False, **kwargs):
        super().__init__(model, **kwargs)
        self.checkpoint_inner = bool(checkpoint_inner)  # second-order steps recomputed in the outer backward
        self.multi_step_loss = bool(multi_step_loss)
        self.msl_anneal_steps = int(msl_anneal_steps)
        self.first_order_until = int(first_order_until)

    # -- the inner loop ---------------------------------------------------------------
    def is_first_order(self, step: Optional[int] = None) -> bool:
        return first_order_at(self.step if step is None else step, self.first_order, self.first_order_until)

    def train_first_order(self) -> None:
        super().train_first_order()
        self.first_order_until = 0

    def _run(self, support: Batch, query: Batch, step: int):
        """Inner loop on ``support``; query losses after the steps the multi-step loss weights."""
        first_order = self.is_first_order(step)
        weights = multi_step_weights(step, self.inner_steps, self.msl_anneal_steps) if self.multi_step_loss else None
        fast: Params = self.inner.theta()
        support_losses, weighted = [], []
        saving = self.checkpoint_inner and not first_order  # memory saver: no memo (see checkpointed_step)
        with contextlib.nullcontext() if saving else self.inner.reusing():
            for k in range(self.inner_steps):
                if saving:
                    fast, loss = self.inner.checkpointed_step(fast, support, self.rate(k))
                    support_losses.append(loss)
                else:
                    loss = self.inner.loss_at(fast, *support)
                    support_losses.append(loss)
                    fast = self.inner.step(fast, loss, self.rate(k), create_graph=not first_order,
                                           retain_graph=self.keeps_support_graph and k == 0)
                if weights is not None and k < self.inner_steps - 1 and weights[k] > 0:
                    weighted.append(weights[k] * self.inner.loss_at(fast, *query))
            query_loss = self.inner.loss_at(fast, *query)
        objective = query_loss if weights is None else sum(weighted) + weights[-1] * query_loss
        return objective, query_loss, support_losses

    def combine(self, objective: torch.Tensor, support_losses: list[torch.Tensor]) -> torch.Tensor:
        """The task's outer objective from its query objective (MLDG adds the support loss)."""
        return objective

    # -- one task's objective -------------------------------------------------------------
    def outer_loss(self, support: Batch, query: Batch, *, step: Optional[int] = None) -> torch.Tensor:
        """Query loss of one task at the adapted weights; ``backward()`` gives the meta-gradient.

        ``step`` (default: the current outer step, 1 before training) drives the MAML++
        schedules; without them it changes nothing.
        """
        self.model.train()
        objective, query_loss, support_losses = self._run(support, query, self.step if step is None else step)
        objective = self.combine(objective, support_losses)
        self.last_stats = {
            "support_loss_before": float(support_losses[0].detach()) if support_losses else float("nan"),
            "support_loss_after": float(support_losses[-1].detach()) if support_losses else float("nan"),
            "query_loss_after": float(query_loss.detach()),
        }
        if not support_losses:
            del self.last_stats["support_loss_before"], self.last_stats["support_loss_after"]
        return objective
