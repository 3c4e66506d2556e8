"""Mixed precision for unrolled inner loops.

``torch.autocast`` covers the forward passes. bf16 has fp32's range and needs nothing else.
fp16 needs loss scaling, and a ``GradScaler`` only scales the *outer* backward: the inner
gradients the inner loop takes with ``torch.autograd.grad`` would underflow unscaled. So the
inner loss is multiplied by the current scale and its gradients divided by it before the
SGD step, PyTorch's AMP "gradient penalty" recipe. A non-finite inner gradient is recorded;
it makes the query loss and therefore the outer gradients non-finite too, so the outer
``GradScaler`` skips that step and lowers the scale, and the next step's inner loop uses
the lowered scale.
"""

from __future__ import annotations

import contextlib

import torch

from metaseg.utils.errors import ConfigError

PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


class Precision:
    """Autocast context and inner-gradient scaling for one precision mode on one device type."""

    def __init__(self, mode: str = "32", device_type: str = "cpu", init_scale: float = 2.0**16):
        mode = str(mode)
        if mode not in PRECISIONS:
            raise ConfigError(
                f"trainer.precision={mode!r} is not one of {', '.join(PRECISIONS)} "
                "(32 = full precision, bf16 = bfloat16 autocast, 16 = float16 autocast with scaling)"
            )
        self.mode, self.device_type, self.dtype = mode, device_type, PRECISIONS[mode]
        self.scale = float(init_scale) if mode == "16" else 1.0
        self.nonfinite = False

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """The outer-step scaler: active for fp16 only, a pass-through otherwise."""
        return torch.amp.GradScaler(self.device_type, init_scale=self.scale, enabled=self.mode == "16")

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.scale != 1.0 else loss

    def unscale(self, grads):
        """Undo :meth:`scaled` on a list of gradients (``None`` for unused parameters)."""
        if self.scale == 1.0:
            return grads
        inv = 1.0 / self.scale
        grads = [None if g is None else g * inv for g in grads]
        present = [torch.isfinite(g).all() for g in grads if g is not None]
        if present and not bool(torch.stack(present).all()):  # one device sync per step
            self.nonfinite = True
        return grads
