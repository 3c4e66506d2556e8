"""What every algorithm of the zoo shares besides the outer step: the inner loop and adaptation.

:class:`MetaLearner` holds the model, the inner-loop settings (K steps at alpha, on the
parameters ``inner_params`` select, optionally at learned step sizes) and runs them: for
few-shot use (``adapt`` gives an adapted copy of the model, ``adapted_params`` its fast
weights without a graph) and for the algorithms' own objectives. It is not an algorithm
itself: it defines no outer objective. MAML (:mod:`metaseg.meta.maml`) and its variants add
the query loss through the inner loop; Reptile and ERM define theirs on the same machinery.
The outer step they all share is :class:`metaseg.meta.base.Algorithm`.

The inner loop is :mod:`metaseg.meta.inner`: higher's functional module by default
(``backend="higher"``), or ``torch.func.functional_call`` (``backend="func"``).

Each algorithm declares its facts on its class (``has_meta_gradient``, ``first_order_only``,
...), read by the config checks of :mod:`metaseg.meta.from_config`, and its own constructor
keywords from a ``MetaConfig`` (``options``).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from metaseg.meta.base import Algorithm, OuterSettings
from metaseg.meta.inner import Params, RateFn, make_inner_loop, select_parameters
from metaseg.meta.losses import LossFn, pixel_cross_entropy
from metaseg.meta.precision import Precision
from metaseg.meta.safety import NonFiniteGuard
from metaseg.utils.errors import CheckpointError

Batch = tuple[torch.Tensor, torch.Tensor]


class MetaLearner(Algorithm):
    """The inner loop around a segmentation ``model``, and few-shot adaptation with it; the base of every algorithm.

    ``adapt(images, masks)`` returns a copy of the model with adapted weights. Subclasses
    define ``outer_loss(support, query)``, one task's objective; ``meta_step`` is a whole
    outer step (:class:`metaseg.meta.base.Algorithm`). Build an algorithm by its class or by
    name from :data:`metaseg.meta.ALGORITHMS`; from a config with
    :func:`metaseg.meta.from_config.make_learner`.
    """

    default_inner_params: Optional[Sequence[str]] = None  # None: every trainable parameter
    # Facts the config checks read (metaseg.meta.from_config), declared by each algorithm:
    has_meta_gradient = False  # an outer gradient flows through the inner steps (multi-step loss, learned rates)
    first_order_only = False  # never differentiates through the inner loop (no second-order probe, no checkpointing)
    learns_step_sizes = False  # its own learned inner rates (Meta-SGD), so meta.inner_lr_per_step applies
    keeps_support_graph = False  # backpropagates the first support loss as well (MLDG)
    min_inner_steps = 0  # fewer inner steps than this leave the algorithm without its objective

    @classmethod
    def options(cls, m: Any) -> dict:
        """The algorithm's own constructor keywords from a ``MetaConfig`` (none here)."""
        return {}

    def __init__(
        self,
        model: nn.Module,
        *,
        inner_lr: float,
        inner_steps: int,
        first_order: bool = False,
        loss: Optional[LossFn] = None,
        precision: Optional[Precision] = None,
        inner_params: Optional[Sequence[str]] = None,
        step_sizes: Optional[nn.Module] = None,
        outer: Optional[OuterSettings] = None,
        backend: str = "higher",
    ):
        if inner_steps < 0:
            raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
        self.model = model
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.first_order = bool(first_order) or self.first_order_only
        self.loss: LossFn = loss or pixel_cross_entropy
        self.precision = precision or Precision("32")
        patterns = self.default_inner_params if inner_params is None else inner_params
        self.inner_names = select_parameters(model, patterns)
        self.inner = make_inner_loop(backend, model, self.loss, self.precision, self.inner_names)
        self.step_sizes = step_sizes
        self.outer = outer or OuterSettings()
        self.guard = NonFiniteGuard(self.outer.max_bad_in_a_row, self.inner_lr)
        self.step = 1  # outer step for the MAML++ schedules; meta_step sets it
        self.logging = False
        self.last_stats: dict[str, float] = {}

    def for_model(self, model: nn.Module) -> "MetaLearner":
        """This learner (algorithm, settings, learned step sizes) around ``model``, a copy of the
        learner's model with other weights (a new head): an inner loop of its own on it, nothing else
        copied, and this learner untouched."""
        twin = copy.copy(self)
        twin.model = model
        twin.inner = make_inner_loop(self.inner.backend, model, self.loss, self.precision, self.inner_names)
        return twin

    # -- the inner loop ---------------------------------------------------------------
    def rate(self, k: int, lr: Optional[float] = None) -> RateFn:
        """Step size of inner step ``k`` per parameter: ``lr`` if given, else learned, else alpha."""
        if lr is None and self.step_sizes is not None:
            return lambda name: self.step_sizes.rate(k, name)
        value = self.inner_lr if lr is None else float(lr)
        return lambda name: value

    def is_first_order(self, step: Optional[int] = None) -> bool:
        """Whether outer step ``step`` (default: the current one) takes no gradient through the inner steps."""
        return self.first_order

    def train_first_order(self) -> None:
        """From now on, no gradient through the inner steps (the model has no second derivative)."""
        self.first_order = True

    # -- one task's objective -------------------------------------------------------------
    def outer_loss(self, support: Batch, query: Batch, *, step: Optional[int] = None) -> torch.Tensor:
        """One task's outer objective; ``backward()`` leaves the algorithm's outer gradient in theta."""
        raise NotImplementedError(f"{type(self).__name__} defines no outer objective: use an algorithm of "
                                  f"metaseg.meta.ALGORITHMS (MetaLearner only adapts)")

    def task_objective(self, task) -> torch.Tensor:
        return self.outer_loss(task.support, task.query)

    @torch.no_grad()
    def query_loss_before(self, task) -> float:
        return float(self.inner.loss_at(self.inner.theta(), *task.query))

    # -- adaptation -----------------------------------------------------------------------
    def adapted_params(self, images: torch.Tensor, masks: torch.Tensor, *, steps: Optional[int] = None,
                       lr: Optional[float] = None, losses: Optional[list] = None, at: Sequence[int] = (),
                       visit: Optional[Callable[[int, Params], None]] = None) -> Params:
        """Fast weights after the inner loop on ``(images, masks)``, with no graph to theta.

        Under fp16, a non-finite inner gradient restarts adaptation at half the scale.
        ``losses``, if given, receives the inner losses (floats) of the final attempt.
        ``visit(t, fast)`` is called once for every step count t of ``at`` (each <= ``steps``)
        with the fast weights after t steps, in increasing t: one adaptation gives the weights
        of every shorter one on the way (the adaptation curve of ``metaseg-eval``). The loop runs
        in chunks between those counts, each continuing from the previous weights, so every
        visited weight is the one ``adapted_params(steps=t)`` returns; ``visit`` runs outside
        the inner loop's grad and memo contexts.
        """
        steps = self.inner_steps if steps is None else int(steps)
        wanted = sorted({int(t) for t in at})
        if wanted and not 0 <= wanted[0] <= wanted[-1] <= steps:
            raise ValueError(f"snapshot step counts {wanted} must lie in 0..steps={steps}")
        stops = [t for t in wanted if t < steps] + [steps]
        visited: set[int] = set()
        was_training = self.model.training
        self.model.train()
        try:
            for attempt in range(32):
                self.precision.nonfinite = False
                fast, done, seen = self.inner.detached(), 0, []
                for stop in stops:
                    fast = self._inner_chunk(fast, images, masks, range(done, stop), lr, seen)
                    done = stop
                    if self._overflowed() and attempt < 31:
                        break  # restart at half the scale, as a separate adaptation to any later count would
                    if visit is not None and stop in wanted and stop not in visited:
                        visited.add(stop)
                        visit(stop, fast)
                if not self._overflowed():
                    break
                self.precision.scale /= 2
        finally:
            self.model.train(was_training)
        if losses is not None:
            losses.extend(float(v) for v in seen)
        return fast

    def _overflowed(self) -> bool:
        """fp16: an inner gradient of this attempt was not finite (the adaptation restarts)."""
        return self.precision.nonfinite and self.precision.mode == "16"

    def _inner_chunk(self, fast: Params, images: torch.Tensor, masks: torch.Tensor, ks: range,
                     lr: Optional[float], seen: list) -> Params:
        """Inner steps ``ks`` (their indices pick learned per-step rates) from ``fast``; no graph kept."""
        if not ks:
            return fast
        with torch.enable_grad(), self.inner.reusing():
            for k in ks:
                loss = self.inner.loss_at(fast, images, masks)
                seen.append(loss.detach())
                fast = self.inner.step(fast, loss, self.rate(k, lr), create_graph=False, detach=True)
        return fast

    def adapt(
        self,
        images: torch.Tensor,
        masks: torch.Tensor,
        *,
        steps: Optional[int] = None,
        lr: Optional[float] = None,
        at: Sequence[int] = (),
        visit: Optional[Callable[[int, nn.Module], None]] = None,
    ) -> nn.Module:
        """A copy of the model after the inner loop on ``(images, masks)``; the model is untouched.

        ``steps`` and ``lr`` default to the meta-training K and alpha (learned step sizes,
        if the algorithm has them; an explicit ``lr`` replaces them). Only the inner
        parameters change (ANIL adapts its head only, at training and test time alike).
        ``visit(t, model)``: called with the model adapted for t steps, for every t of ``at``,
        on the way (see :meth:`adapted_params`). It is one copy, reloaded at every count and
        finally returned (a deep copy per count would cost more than scoring a small model):
        use it within the call. A wrapper that prepares the model before adapting (a new head)
        passes both through and its preparation holds for every count.
        """
        adapted: Optional[nn.Module] = None

        def load(fast: Params) -> nn.Module:
            nonlocal adapted
            adapted = self.with_weights(fast, into=adapted)
            return adapted

        hook = None if visit is None else (lambda t, fast: visit(t, load(fast)))
        return load(self.adapted_params(images, masks, steps=steps, lr=lr, at=at, visit=hook))

    def with_weights(self, fast: Params, into: Optional[nn.Module] = None) -> nn.Module:
        """A copy of the model in training mode with the inner parameters set to ``fast``;
        ``into``: an earlier such copy, reloaded (all of the model's state, then ``fast``)."""
        if into is None:
            adapted = copy.deepcopy(self.model)
        else:
            adapted = into
            adapted.load_state_dict(self.model.state_dict())
        adapted.train()
        with torch.no_grad():
            for name, p in adapted.named_parameters():
                if name in self.inner.names:
                    p.copy_(fast[name])
        return adapted

    # -- learned step sizes in the outer optimizer and the checkpoint ---------------------
    def extra_parameters(self) -> list[nn.Parameter]:
        return list(self.step_sizes.parameters()) if self.step_sizes is not None else []

    def meta_state_dict(self) -> dict:
        return {"step_sizes": self.step_sizes.export()} if self.step_sizes is not None else {}

    def load_meta_state_dict(self, state: Optional[dict]) -> None:
        state = state or {}
        if self.step_sizes is None:
            if state.get("step_sizes"):
                raise CheckpointError("the checkpoint has learned inner step sizes (meta_state.step_sizes) but "
                                      f"algorithm {self.name!r} without meta.learn_inner_lr does not use them")
            return
        if not state.get("step_sizes"):
            raise CheckpointError(f"algorithm {self.name!r} learns its inner step sizes, but the checkpoint has "
                                  "no meta_state.step_sizes to restore them from")
        self.step_sizes.load(state["step_sizes"])
