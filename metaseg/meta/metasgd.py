"""Meta-SGD (Li et al., 2017): inner step sizes learned with theta; MAML++'s per-step rates.

``StepSizes`` holds one learnable rate per adapted parameter tensor (``per_element=False``)
or one per element (``per_element=True``), optionally a separate set for every inner step
(``steps=K``: MAML++'s "learning per-layer per-step learning rates"). They start at alpha,
are updated by the outer optimizer with theta, and since the inner update
``phi - rate * grad`` is differentiable in ``rate``, they get meta-gradients in first order
too. They are saved in the checkpoint (``meta_state["step_sizes"]``, plain tensors by
parameter name) and used when ``metaseg-eval`` adapts; beyond the K learned steps the
last step's rates are reused.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

from metaseg.meta.maml import MAML
from metaseg.utils.errors import CheckpointError


class StepSizes(nn.Module):
    """Learnable inner step sizes for the named parameters, shape ``(steps, *param.shape or ())``."""

    def __init__(self, params: Mapping[str, torch.Tensor], init: float, *, per_element: bool = False,
                 steps: int = 1):
        super().__init__()
        if steps < 1:
            raise ValueError(f"step sizes need steps >= 1, got {steps}")
        self.names = list(params)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.per_element, self.steps = bool(per_element), int(steps)
        self.values = nn.ParameterList([
            nn.Parameter(torch.full((self.steps, *(p.shape if per_element else ())), float(init),
                                    dtype=p.dtype, device=p.device))
            for p in params.values()
        ])

    def rate(self, k: int, name: str) -> torch.Tensor:
        table = self.values[self.index[name]]
        return table[min(k, self.steps - 1)]

    def export(self) -> dict[str, torch.Tensor]:
        return {n: v.detach().cpu().clone() for n, v in zip(self.names, self.values)}

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing or len(state) != len(self.names):
            extra = sorted(set(state) - set(self.names))
            raise CheckpointError(f"meta_state.step_sizes does not fit this model's inner parameters "
                                  f"(missing {missing[:3]}, unexpected {extra[:3]})")
        with torch.no_grad():
            for n, v in zip(self.names, self.values):
                if tuple(state[n].shape) != tuple(v.shape):
                    raise CheckpointError(f"meta_state.step_sizes[{n!r}] has shape {tuple(state[n].shape)}, "
                                          f"expected {tuple(v.shape)} (meta.inner_lr_granularity / "
                                          f"meta.inner_lr_per_step differ)")
                v.copy_(state[n])


class MetaSGD(MAML):
    """MAML whose inner step sizes are meta-learned (per tensor or per element)."""

    name = "metasgd"
    learns_step_sizes = True

    @classmethod
    def options(cls, m) -> dict:
        return {**super().options(m), "per_element": m.inner_lr_granularity == "element",
                "per_step": bool(m.inner_lr_per_step)}

    def __init__(self, model: nn.Module, *, per_element: bool = False, per_step: bool = False,
                 step_sizes: Optional[StepSizes] = None, **kwargs):
        super().__init__(model, **kwargs)
        if step_sizes is None:
            params = dict(model.named_parameters())
            step_sizes = StepSizes({n: params[n] for n in self.inner_names}, self.inner_lr,
                                   per_element=per_element, steps=max(self.inner_steps, 1) if per_step else 1)
        self.step_sizes = step_sizes
