"""Inner-loop safety: a task whose inner or query loss is not finite is skipped, not averaged in.

One bad task (an unlucky batch, a too-large step on a hard image) should not poison theta,
so its loss is never backpropagated; the skip is counted and logged. Several in a row mean
the inner loop diverges as configured, usually a step size alpha too large for the model,
and the run stops with that advice rather than training on NaNs.

fp16 is the exception: a non-finite *inner gradient* there is loss-scale overflow, not
divergence. Such a task is backpropagated anyway so that the outer ``GradScaler`` sees the
non-finite gradient, skips the step and lowers the scale, as AMP does for plain training.

Divergence can also stay finite: a huge alpha gives query losses of 1e11, a huge beta weights
of 1e30, and nothing above is triggered. :class:`DivergenceWatch` looks after every outer step
(before anything is saved, so a diverged state never replaces a good checkpoint) and stops the
run when, against this process's first step:

* the weights' norm grew more than ``NORM_FACTOR`` (1e3) times, or is not finite: the outer
  step (beta) is too large;
* the loss at theta before adaptation grew more than ``LOSS_FACTOR`` (1e6) times: beta again;
* the query loss after adaptation did, while theta's own loss did not: the inner loop (alpha).

The loss reference is the first step's loss at theta, at least 1, so that a well-trained run
resumed at a tiny loss is not stopped by an ordinary hard task. Both factors are orders of
magnitude beyond what a run that learns ever shows.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Mapping, Optional

import torch

from metaseg.utils.errors import MetasegError

log = logging.getLogger(__name__)
NO_INNER_STEP_SIZE = ("erm",)  # algorithms whose training takes no step at alpha (DivergenceWatch)


class DivergenceError(MetasegError):
    """The inner loop produced non-finite losses on several tasks in a row."""


class NonFiniteGuard:
    """Counts skipped tasks; ``limit`` in a row raise :class:`DivergenceError`."""

    def __init__(self, limit: int = 3, inner_lr: float | None = None):
        self.limit, self.inner_lr = limit, inner_lr
        self.in_a_row = 0
        self.total = 0

    @staticmethod
    def finite(*values: float) -> bool:
        return all(math.isfinite(v) for v in values)

    def ok(self) -> None:
        self.in_a_row = 0

    def skip(self, step: int, what: str) -> None:
        self.in_a_row += 1
        self.total += 1
        log.warning("step %d: %s is not finite; task skipped (%d in a row, %d in all)",
                    step, what, self.in_a_row, self.total)
        if self.in_a_row >= self.limit:
            alpha = f" (now {self.inner_lr:g})" if self.inner_lr is not None else ""
            raise DivergenceError(
                f"{self.limit} tasks in a row had a non-finite {what} (step {step}): the inner loop "
                f"diverges; use a smaller meta.inner_lr{alpha}, or set meta.clip_grad / a smaller meta.outer_lr")


def weight_norm(params: Iterable[torch.Tensor]) -> float:
    """The L2 norm of all ``params`` together."""
    tensors = [p.detach() for p in params]
    return float(torch.nn.utils.get_total_norm(tensors)) if tensors else 0.0


class DivergenceWatch:
    """Stops a run whose losses or weights grew by orders of magnitude (see the module docstring).

    ``inner_lr`` None: training takes no step at alpha (``erm``'s inner steps are outer steps),
    so every divergence is beta's.
    """

    LOSS_FACTOR = 1e6
    NORM_FACTOR = 1e3

    def __init__(self, params: Iterable[torch.Tensor], inner_lr: Optional[float], outer_lr: float):
        self.params = list(params)
        self.inner_lr, self.outer_lr = inner_lr, outer_lr
        self.norm0 = weight_norm(self.params)
        self.loss0: Optional[float] = None

    @classmethod
    def of(cls, learner: Any) -> "DivergenceWatch":
        """The watch of ``learner``'s weights, with the step sizes its training uses."""
        alpha = None if learner.name in NO_INNER_STEP_SIZE else learner.inner_lr
        return cls(learner.model.parameters(), alpha, learner.outer.lr)

    def check(self, step: int, stats: Mapping[str, float]) -> None:
        """Raise :class:`DivergenceError` if the step's ``stats`` or the weights after it diverged."""
        before, after = stats.get("support_loss_before"), stats.get("query_loss_after")
        if self.loss0 is None:
            first = next((v for v in (before, after) if v is not None and math.isfinite(v)), None)
            self.loss0 = None if first is None else max(float(first), 1.0)
        limit = self.LOSS_FACTOR * self.loss0 if self.loss0 is not None else math.inf
        theta_grew = before is not None and math.isfinite(before) and before > limit
        adapted_grew = after is not None and math.isfinite(after) and after > limit and not theta_grew
        norm = weight_norm(self.params)
        norm_grew = not math.isfinite(norm) or norm > self.NORM_FACTOR * max(self.norm0, 1e-12)
        if adapted_grew and self.inner_lr is not None:  # theta was fine, the inner steps from it were not
            grown = f"; the weights' norm then grew from {self.norm0:.3g} to {norm:.3g}" if norm_grew else ""
            raise DivergenceError(
                f"the inner loop diverges at step {step}: the query loss after adaptation reached {after:.3g} (over "
                f"{self.LOSS_FACTOR:g} times the first step's {self.loss0:.3g}) from a loss before it of "
                f"{before if before is not None else float('nan'):.3g}{grown}, so the inner step size alpha is too "
                f"large: use a smaller meta.inner_lr (now {self.inner_lr:g}) or fewer meta.inner_steps")
        if norm_grew:
            what = f"the weights' norm grew from {self.norm0:.3g} to {norm:.3g} (over {self.NORM_FACTOR:g} times)"
        elif theta_grew or adapted_grew:
            where = "before adaptation" if theta_grew else "after its inner steps"
            what = (f"the loss {where} reached {before if theta_grew else after:.3g} (over {self.LOSS_FACTOR:g} "
                    f"times the first step's {self.loss0:.3g})")
        else:
            return
        raise DivergenceError(f"training diverges at step {step}: {what}, so the outer step size beta is too large: "
                              f"use a smaller meta.outer_lr (now {self.outer_lr:g}) or set meta.clip_grad")
