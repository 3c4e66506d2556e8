"""MLDG (Li et al., 2018), the cross-dataset rule: adapt on D_i, be good on D_j too.

A task is a support batch of dataset D_i and a query batch of another dataset D_j of the
mix (``meta.query_from: other``). The inner loop adapts on D_i (K steps; K = 1 is the
paper's single virtual step theta' = theta - alpha * grad L_i(theta)); the outer objective
is L_i(theta) + gamma * L_j(theta'): fit D_i, in a way that also helps the unseen D_j.
Second order differentiates L_j(theta') through the inner step; first order
(``meta.first_order``) takes grad L_i(theta) + gamma * grad L_j at theta', the paper's
first-order variant. L_i(theta) is the first inner step's loss, so it costs nothing extra;
its graph is kept for the outer backward.
"""

from __future__ import annotations

import torch
from torch import nn

from metaseg.meta.maml import MAML


class MLDG(MAML):
    name = "mldg"
    keeps_support_graph = True
    min_inner_steps = 1  # its D_i loss is the first inner step's support loss

    @classmethod
    def options(cls, m) -> dict:
        return {**super().options(m), "gamma": m.gamma}

    def __init__(self, model: nn.Module, *, gamma: float = 1.0, **kwargs):
        super().__init__(model, **kwargs)
        if self.inner_steps < 1:
            raise ValueError("MLDG needs inner_steps >= 1 (its meta-train loss is the first inner step's)")
        self.gamma = float(gamma)

    def combine(self, objective: torch.Tensor, support_losses: list[torch.Tensor]) -> torch.Tensor:
        return support_losses[0] + self.gamma * objective
