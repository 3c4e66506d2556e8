"""Can this model be meta-trained second order? Asked once, when the model is built.

Second-order MAML differentiates the inner gradient again. Some layers have no second
derivative: timm's hard-swish / hard-sigmoid (MobileNetV3, ``tu-mobilenetv3_*``) fail with
``derivative for aten::hardsigmoid_backward is not implemented``, and only at the outer
``backward()``, after a full inner loop. :func:`second_order_problem` runs one tiny inner
step and outer gradient on the model to find that before training starts; the build step
then stops with the fix, or falls back to first order with a warning
(``meta.second_order_fallback``).

Not detected: a custom autograd function whose backward runs outside autograd (under
``no_grad``) loses its second-order terms silently; autograd still attaches the
neighbouring layers' double-backward nodes, so nothing looks wrong. A finite-difference
check of the meta-gradient cannot tell either: on ReLU networks the meta-loss jumps
wherever a unit crosses its kink (the inner gradient does), so it disagrees with a correct
gradient too. The smp encoders tried (resnet, mobilenet_v2, timm-efficientnet, mobileone)
either work or raise.

Parameters the forward pass never reaches (efficientnet-b0's unused stages) are no
problem here: the inner loop takes gradients with ``allow_unused`` and leaves them at theta;
the probe reports them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from metaseg.meta.inner import InnerLoop
from metaseg.meta.precision import Precision
from metaseg.utils.errors import ConfigError

FIX = ("set meta.first_order=true (or meta=fomaml, meta=reptile), or meta.second_order_fallback=true "
       "to fall back to first order with a warning")


class SecondOrderError(ConfigError):
    """The model has a layer without a usable second derivative."""


@dataclass
class Probe:
    problem: Optional[str] = None  # why second order fails; None: it works
    unused: list[str] = field(default_factory=list)  # parameters no inner gradient reaches


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def second_order_problem(model: nn.Module, loss: Callable, names: Sequence[str], *, in_channels: int = 3,
                         size: int = 64, batch: int = 2) -> Probe:
    """One second-order inner step and outer gradient on a random batch; what went wrong, if anything.

    Uses its own random generator (the run's RNG stream is untouched) and leaves no ``.grad``.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, in_channels, size, size, generator=gen, dtype=dtype).to(device)
    inner = InnerLoop(model, loss, Precision("32"), names)
    was_training = model.training
    model.train()
    try:
        theta = inner.theta()
        with torch.no_grad():
            classes = model(x).shape[1]
        y = torch.randint(0, classes, (batch, size, size), generator=gen).to(device)
        support = inner.loss_at(theta, x, y)
        grads = torch.autograd.grad(support, [theta[n] for n in names], create_graph=True, allow_unused=True)
        unused = [n for n, g in zip(names, grads) if g is None]
        fast = dict(theta)
        for n, g in zip(names, grads):
            if g is not None:
                fast[n] = theta[n] - 0.01 * g
        query = inner.loss_at(fast, x, y)
        torch.autograd.grad(query, list(theta.values()), allow_unused=True)
    except (RuntimeError, NotImplementedError) as exc:
        return Probe(_first_line(exc))
    finally:
        model.train(was_training)
    return Probe(None, unused)


@contextlib.contextmanager
def raise_if_second_order_failure():
    """Turn autograd's missing-double-backward error at the outer backward into a one-line user error."""
    try:
        yield
    except RuntimeError as exc:
        msg = _first_line(exc)
        if "derivative for" in msg and "not implemented" in msg:
            raise SecondOrderError(f"this model cannot be meta-trained second order ({msg}); {FIX}") from exc
        raise
