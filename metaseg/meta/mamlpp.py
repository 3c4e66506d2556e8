"""MAML++ schedules (Antoniou et al., 2019), as pure functions of the outer step.

Being functions of the step number and not stateful schedulers, they need nothing saved in
a checkpoint: a resumed run at step s gets exactly the weights, order and beta of step s.
Outer steps count from 1, as the trainer does.

* Multi-step loss: the query loss after every inner step, weighted; weights start uniform
  and anneal to the last step over ``anneal_steps`` outer steps, after which only the last
  step counts (the paper's per-step importance vector, with outer steps for epochs).
* Derivative-order annealing: first order for the first ``until`` outer steps, then second.
* Cosine annealing of beta from ``base`` at the first step towards ``minimum`` at the last.
"""

from __future__ import annotations

import math
from typing import Optional


def multi_step_weights(step: int, inner_steps: int, anneal_steps: int) -> Optional[list[float]]:
    """Weights of the query losses after inner steps 1..K at outer ``step``; ``None``: last step only."""
    k = inner_steps
    if k < 2 or step > anneal_steps:
        return None
    t = max(step - 1, 0)
    decay = 1.0 / k / max(anneal_steps, 1)
    floor = 0.03 / k
    weights = [max(1.0 / k - t * decay, floor) for _ in range(k - 1)]
    weights.append(min(1.0 / k + t * (k - 1) * decay, 1.0 - (k - 1) * floor))
    return weights


def first_order_at(step: int, first_order: bool, until: int) -> bool:
    """Derivative-order annealing: first order while ``step <= until``."""
    return first_order or step <= until


def outer_lr_at(step: int, base: float, schedule: str, max_steps: int, minimum: float = 0.0) -> float:
    """beta at outer ``step``: constant, or cosine from ``base`` (step 1) towards ``minimum``."""
    if schedule == "constant":
        return base
    if schedule == "cosine":
        progress = min(max(step - 1, 0) / max(max_steps, 1), 1.0)
        return minimum + (base - minimum) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown outer-lr schedule {schedule!r}")
