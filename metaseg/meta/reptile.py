"""Reptile (Nichol et al., 2018): move theta towards the weights each task adapts to.

Per task, K plain SGD steps at alpha on the support batch give phi_K (no graph, no query
backward); the outer update is theta <- theta + epsilon * mean_tasks(phi_K - theta), with
epsilon = ``meta.outer_lr``. It is written as the gradient of the surrogate
1/2 ||theta - phi_K||^2 (whose gradient is theta - phi_K) stepped by plain SGD at
epsilon, so it shares the outer step's averaging, clipping, fp16 ``GradScaler`` and
schedules (cosine annealing of epsilon, as in the paper's linear decay) with the other
algorithms. The query batch is only scored (no gradient) when the step is logged, so
``query_loss_after`` is comparable with MAML's curves; the logged ``outer_loss`` is the
surrogate, the squared distance travelled.
"""

from __future__ import annotations

from typing import Optional

import torch

from metaseg.meta.learner import Batch, MetaLearner


class Reptile(MetaLearner):
    name = "reptile"
    has_meta_gradient = False  # theta moves towards phi; nothing is differentiated through the inner loop
    first_order_only = True  # no gradient through any inner loop, by construction

    def make_optimizer(self) -> torch.optim.Optimizer:
        """Plain SGD at epsilon: one step is exactly theta + epsilon * (mean phi - theta)."""
        return torch.optim.SGD(self.parameters(), lr=self.outer.lr)

    def outer_loss(self, support: Batch, query: Batch, *, step: Optional[int] = None) -> torch.Tensor:
        """1/2 ||theta - phi_K||^2 over the adapted parameters; its gradient is theta - phi_K."""
        losses: list[float] = []
        fast = self.adapted_params(*support, losses=losses)
        theta = dict(self.model.named_parameters())
        objective = sum(0.5 * (theta[n] - fast[n].detach()).pow(2).sum() for n in self.inner.names)
        self.last_stats = {"support_loss_before": losses[0], "support_loss_after": losses[-1]} if losses else {}
        if self.logging:
            with torch.no_grad():
                self.last_stats["query_loss_after"] = float(self.inner.loss_at(fast, *query))
        return objective
