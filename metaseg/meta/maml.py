"""MAML on higher: the inner loop, the outer loss of one task, and few-shot adaptation.

One task is a support batch and a query batch. The inner loop takes ``inner_steps`` (K)
plain SGD steps at ``inner_lr`` (alpha) on the support loss, starting from the model's own
parameters theta; the outer loss is the query loss at the adapted weights phi_K. Its
``backward()`` leaves d L_query(phi_K) / d theta in ``theta.grad``, the MAML meta-gradient,
which the caller averages over tasks and hands to the outer optimizer (beta).

Second order (default) differentiates through the K steps. First order skips that: the
query gradient is taken at phi_K and applied to theta as it is (FOMAML). higher gives the
initial weights no gradient at all when it does not track higher gradients, so that
gradient is attached to theta explicitly through a surrogate whose value is the query loss.
"""

from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence

import higher
import torch
import torch.nn.functional as F
from torch import nn

from metaseg.meta.precision import Precision

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
IGNORE_INDEX = 255


def pixel_cross_entropy(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Pixel-wise cross-entropy, mean over labelled pixels; 255 marks pixels to ignore."""
    return F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX)


def _full_precision(logits: torch.Tensor) -> torch.Tensor:
    """Losses are computed in fp32 at least: autocast logits are upcast, fp64 stays fp64."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


class MetaLearner:
    """Model-agnostic meta-learning for a segmentation ``model``.

    ``outer_loss(support, query)`` returns one task's query loss after adaptation;
    ``adapt(images, masks)`` returns a copy of the model with adapted weights, for
    few-shot use on a new dataset. Both run the same inner loop.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        inner_lr: float,
        inner_steps: int,
        first_order: bool = False,
        loss: Optional[LossFn] = None,
        precision: Optional[Precision] = None,
    ):
        if inner_steps < 0:
            raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
        self.model = model
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.first_order = bool(first_order)
        self.loss: LossFn = loss or pixel_cross_entropy
        self.precision = precision or Precision("32")
        self.last_stats: dict[str, float] = {}

    # -- the inner loop ---------------------------------------------------------------
    def _forward_loss(self, fmodel: nn.Module, images: torch.Tensor, masks: torch.Tensor):
        with self.precision.autocast():
            logits = fmodel(images)
        return self.loss(_full_precision(logits), masks)

    def _inner_loop(self, fmodel, diffopt, images, masks, steps: int) -> list[torch.Tensor]:
        """K differentiable SGD steps on the support batch; returns the support losses."""
        losses = []
        for _ in range(steps):
            loss = self._forward_loss(fmodel, images, masks)
            diffopt.step(self.precision.scaled(loss), grad_callback=self.precision.unscale)
            losses.append(loss.detach())
        return losses

    def _inner_ctx(self, model: nn.Module, lr: float, track: bool, copy_initial: bool):
        inner_opt = torch.optim.SGD(model.parameters(), lr=lr)
        return higher.innerloop_ctx(
            model, inner_opt, copy_initial_weights=copy_initial, track_higher_grads=track
        )

    # -- public API -------------------------------------------------------------------
    def outer_loss(self, support: Batch, query: Batch) -> torch.Tensor:
        """Query loss of one task at the adapted weights; ``backward()`` gives the meta-gradient."""
        self.model.train()
        params = list(self.model.parameters())
        with self._inner_ctx(self.model, self.inner_lr, not self.first_order, False) as (fmodel, diffopt):
            support_losses = self._inner_loop(fmodel, diffopt, *support, self.inner_steps)
            query_loss = self._forward_loss(fmodel, *query)
            if self.first_order:
                query_loss = self._first_order_surrogate(query_loss, fmodel.fast_params, params)
        self.last_stats = {
            "support_loss_before": float(support_losses[0]) if support_losses else float("nan"),
            "support_loss_after": float(support_losses[-1]) if support_losses else float("nan"),
            "query_loss_after": float(query_loss.detach()),
        }
        return query_loss

    def _first_order_surrogate(
        self, query_loss: torch.Tensor, fast: Sequence[torch.Tensor], params: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """A tensor equal to ``query_loss`` whose gradient w.r.t. theta is dL/dphi_K."""
        targets = [p for p in fast if p.requires_grad]
        grads = torch.autograd.grad(self.precision.scaled(query_loss), targets, allow_unused=True)
        grads = iter(self.precision.unscale(list(grads)))
        surrogate = query_loss.detach()
        for theta, phi in zip(params, fast):
            g = next(grads) if phi.requires_grad else None
            if g is not None and theta.requires_grad:
                surrogate = surrogate + ((theta - theta.detach()) * g.detach()).sum()
        return surrogate

    def adapt(
        self,
        images: torch.Tensor,
        masks: torch.Tensor,
        *,
        steps: Optional[int] = None,
        lr: Optional[float] = None,
    ) -> nn.Module:
        """A copy of the model after the inner loop on ``(images, masks)``; the model is untouched.

        ``steps`` and ``lr`` default to the meta-training K and alpha. Under fp16, a
        non-finite gradient restarts adaptation at half the scale.
        """
        steps = self.inner_steps if steps is None else int(steps)
        lr = self.inner_lr if lr is None else float(lr)
        adapted = copy.deepcopy(self.model).train()
        for _ in range(32):
            self.precision.nonfinite = False
            with self._inner_ctx(adapted, lr, False, True) as (fmodel, diffopt):
                with torch.enable_grad():
                    self._inner_loop(fmodel, diffopt, images, masks, steps)
                fast = fmodel.fast_params
            if not (self.precision.nonfinite and self.precision.mode == "16"):
                break
            self.precision.scale /= 2
        with torch.no_grad():
            for p, f in zip(adapted.parameters(), fast):
                p.copy_(f)
        return adapted
