"""Inner-loop safety: a task whose inner or query loss is not finite is skipped, not averaged in.

One bad task (an unlucky batch, a too-large step on a hard image) should not poison theta,
so its loss is never backpropagated; the skip is counted and logged. Several in a row mean
the inner loop diverges as configured, usually a step size alpha too large for the model,
and the run stops with that advice rather than training on NaNs.

fp16 is the exception: a non-finite *inner gradient* there is loss-scale overflow, not
divergence. Such a task is backpropagated anyway so that the outer ``GradScaler`` sees the
non-finite gradient, skips the step and lowers the scale, as AMP does for plain training.
"""

from __future__ import annotations

import logging
import math

from metaseg.utils.errors import MetasegError

log = logging.getLogger(__name__)


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
