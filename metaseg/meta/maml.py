"""MAML: the inner loop, the outer loss of one task, few-shot adaptation; and the MAML++ options.

One task is a support batch and a query batch. The inner loop takes ``inner_steps`` (K)
SGD steps at ``inner_lr`` (alpha) on the support loss, starting from the model's own
parameters theta; the outer loss is the query loss at the adapted weights phi_K. Its
``backward()`` leaves d L_query(phi_K) / d theta in ``theta.grad``, the MAML meta-gradient,
which the outer step averages over tasks and hands to the outer optimizer (beta).

Second order (default) differentiates through the K steps. First order (FOMAML) takes the
inner gradients without a graph, so the query gradient at phi_K reaches theta unchanged.

Options, all off by default, each one keyword (and one ``meta.*`` key):

* ``inner_params``: module-name patterns adapted in the inner loop; the rest stay theta
  there and are still meta-learned (ANIL, :mod:`metaseg.meta.anil`);
* ``step_sizes``: learned inner step sizes, per tensor or per element, optionally per
  inner step (Meta-SGD, MAML++'s LSLR, :mod:`metaseg.meta.metasgd`);
* ``multi_step_loss``: the query loss after every inner step with annealed weights;
  ``first_order_until``: first order for the first N outer steps (MAML++,
  :mod:`metaseg.meta.mamlpp`). Both follow the outer step number ``step``.

The inner loop is :mod:`metaseg.meta.inner`: higher's functional module by default
(``backend="higher"``), or ``torch.func.functional_call`` (``backend="func"``).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metaseg.meta.base import Algorithm, OuterSettings
from metaseg.meta.inner import Params, RateFn, make_inner_loop, select_parameters
from metaseg.meta.mamlpp import first_order_at, multi_step_weights
from metaseg.meta.precision import Precision
from metaseg.meta.safety import NonFiniteGuard
from metaseg.utils.errors import CheckpointError

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
IGNORE_INDEX = 255


def pixel_cross_entropy(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Pixel-wise cross-entropy, mean over labelled pixels; 255 marks pixels to ignore."""
    return F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX)


def ce_dice(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus soft Dice loss of the classes after background, over the batch.

    Cross-entropy alone lets a rare, thin class (vessels: a tenth of a fundus patch) lose to
    the background prior in a few steps; the Dice term weighs the class by its own overlap.
    Pixels labelled 255 count in neither term; a class absent from batch and prediction adds
    ~0 (the smoothing term), so a background-only batch is not punished. Twice differentiable.
    """
    valid = (masks != IGNORE_INDEX).unsqueeze(1)
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=1)[:, 1:] * valid
    onehot = F.one_hot(masks.clamp(max=logits.shape[1] - 1), logits.shape[1]).movedim(-1, 1)[:, 1:] * valid
    dims = (0, 2, 3)
    inter, total = (probs * onehot).sum(dims), probs.sum(dims) + onehot.sum(dims)
    dice = 1 - (2 * inter + 1) / (total + 1)
    return pixel_cross_entropy(logits, masks) + dice.mean()


LOSSES: dict[str, LossFn] = {"ce": pixel_cross_entropy, "ce_dice": ce_dice}


class MetaLearner(Algorithm):
    """Model-agnostic meta-learning for a segmentation ``model``; the base of every algorithm.

    ``outer_loss(support, query)`` returns one task's query loss after adaptation;
    ``adapt(images, masks)`` returns a copy of the model with adapted weights, for
    few-shot use on a new dataset. Both run the same inner loop. ``meta_step`` is a whole
    outer step (:class:`metaseg.meta.base.Algorithm`). ``MetaLearner.create(name, ...)``
    builds any algorithm of :data:`metaseg.meta.ALGORITHMS` by name.
    """

    name = "maml"
    default_inner_params: Optional[Sequence[str]] = None  # None: every trainable parameter
    keeps_support_graph = False  # MLDG backpropagates the first support loss as well
    # Facts the config checks read (metaseg.engine.build), declared by each algorithm:
    has_meta_gradient = True  # an outer gradient flows through the inner steps (multi-step loss, learned rates)
    first_order_only = False  # never differentiates through the inner loop (no second-order probe, no checkpointing)
    learns_step_sizes = False  # its own learned inner rates (Meta-SGD), so meta.inner_lr_per_step applies
    min_inner_steps = 0  # fewer inner steps than this leave the algorithm without its objective

    @classmethod
    def options(cls, m: Any) -> dict:
        """The algorithm's own constructor keywords from a ``MetaConfig`` (none for MAML)."""
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
        multi_step_loss: bool = False,
        msl_anneal_steps: int = 100,
        first_order_until: int = 0,
        outer: Optional[OuterSettings] = None,
        backend: str = "higher",
        checkpoint_inner: bool = False,
    ):
        if inner_steps < 0:
            raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
        self._model = model
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.first_order = bool(first_order)
        self.loss: LossFn = loss or pixel_cross_entropy
        self.precision = precision or Precision("32")
        patterns = self.default_inner_params if inner_params is None else inner_params
        self.inner_names = select_parameters(model, patterns)
        self.inner = make_inner_loop(backend, model, self.loss, self.precision, self.inner_names)
        self.checkpoint_inner = bool(checkpoint_inner)  # second-order steps recomputed in the outer backward
        self.step_sizes = step_sizes
        self.multi_step_loss = bool(multi_step_loss)
        self.msl_anneal_steps = int(msl_anneal_steps)
        self.first_order_until = int(first_order_until)
        self.outer = outer or OuterSettings()
        self.guard = NonFiniteGuard(self.outer.max_bad_in_a_row, self.inner_lr)
        self.step = 1  # outer step for the MAML++ schedules; meta_step sets it
        self.logging = False
        self.last_stats: dict[str, float] = {}

    @property
    def model(self) -> nn.Module:
        return self._model

    @model.setter
    def model(self, model: nn.Module) -> None:
        """Replacing the model (a new head, a copy) also moves the inner loop onto it."""
        self._model = model
        self.inner.set_model(model)

    @classmethod
    def create(cls, name: str, model: nn.Module, **kwargs) -> "MetaLearner":
        """The algorithm called ``name`` (maml, fomaml, anil, metasgd, reptile, mldg, erm) around ``model``."""
        from metaseg.meta import ALGORITHMS

        if name not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(ALGORITHMS)}")
        return ALGORITHMS[name](model, **kwargs)

    # -- the inner loop ---------------------------------------------------------------
    def rate(self, k: int, lr: Optional[float] = None) -> RateFn:
        """Step size of inner step ``k`` per parameter: ``lr`` if given, else learned, else alpha."""
        if lr is None and self.step_sizes is not None:
            return lambda name: self.step_sizes.rate(k, name)
        value = self.inner_lr if lr is None else float(lr)
        return lambda name: value

    def is_first_order(self, step: Optional[int] = None) -> bool:
        return first_order_at(self.step if step is None else step, self.first_order, self.first_order_until)

    def _run(self, support: Batch, query: Batch, step: int):
        """Inner loop on ``support``; query losses after the steps the multi-step loss weights."""
        first_order = self.is_first_order(step)
        weights = multi_step_weights(step, self.inner_steps, self.msl_anneal_steps) if self.multi_step_loss else None
        fast: Params = self.inner.theta()
        support_losses, weighted = [], []
        saving = self.checkpoint_inner and not first_order  # memory saver: no memo (see checkpointed_step)
        with contextlib.nullcontext() if saving else self.inner.reusing():
            for k in range(self.inner_steps):
                if saving:
                    fast, loss = self.inner.checkpointed_step(fast, support, self.rate(k))
                    support_losses.append(loss)
                else:
                    loss = self.inner.loss_at(fast, *support)
                    support_losses.append(loss)
                    fast = self.inner.step(fast, loss, self.rate(k), create_graph=not first_order,
                                           retain_graph=self.keeps_support_graph and k == 0)
                if weights is not None and k < self.inner_steps - 1 and weights[k] > 0:
                    weighted.append(weights[k] * self.inner.loss_at(fast, *query))
            query_loss = self.inner.loss_at(fast, *query)
        objective = query_loss if weights is None else sum(weighted) + weights[-1] * query_loss
        return objective, query_loss, support_losses

    def combine(self, objective: torch.Tensor, support_losses: list[torch.Tensor]) -> torch.Tensor:
        """The task's outer objective from its query objective (MLDG adds the support loss)."""
        return objective

    # -- public API -------------------------------------------------------------------
    def outer_loss(self, support: Batch, query: Batch, *, step: Optional[int] = None) -> torch.Tensor:
        """Query loss of one task at the adapted weights; ``backward()`` gives the meta-gradient.

        ``step`` (default: the current outer step, 1 before training) drives the MAML++
        schedules; without them it changes nothing.
        """
        self.model.train()
        objective, query_loss, support_losses = self._run(support, query, self.step if step is None else step)
        objective = self.combine(objective, support_losses)
        self.last_stats = {
            "support_loss_before": float(support_losses[0].detach()) if support_losses else float("nan"),
            "support_loss_after": float(support_losses[-1].detach()) if support_losses else float("nan"),
            "query_loss_after": float(query_loss.detach()),
        }
        if not support_losses:
            del self.last_stats["support_loss_before"], self.last_stats["support_loss_after"]
        return objective

    def task_objective(self, task) -> torch.Tensor:
        return self.outer_loss(task.support, task.query)

    @torch.no_grad()
    def query_loss_before(self, task) -> float:
        return float(self.inner.loss_at(self.inner.theta(), *task.query))

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
