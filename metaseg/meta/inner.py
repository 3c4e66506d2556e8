"""The inner loop every algorithm shares: SGD on a chosen subset of the parameters.

Two backends run the model with fast weights: ``higher`` (default; :class:`HigherInnerLoop`,
higher's ``monkeypatch``ed functional module called with ``params=``) and ``func``
(:class:`InnerLoop`, ``torch.func.functional_call``). Both feed the same SGD step below, so
they give the same numbers (``tests/unit/test_backends.py``); both reuse the outputs of modules
with no adapted parameter (ANIL): ``func`` memoises the model's modules, ``higher`` the
matching modules of its patched copy.

``checkpointed_step`` is the memory saver for long second-order loops
(``meta.checkpoint_inner``): a whole inner step (forward, gradient with its graph, update)
runs under non-reentrant activation checkpointing, so its activations are dropped and
recomputed during the outer backward. Checkpointing only the forward would save nothing:
the inner gradient taken with ``create_graph=True`` recomputes it at once and its
double-backward graph keeps the recomputed activations until the outer backward.

Fast weights are a dict ``name -> tensor`` run through the model with
``torch.func.functional_call``, so one step is plain autograd:
``phi' = phi - lr * grad(L(phi))``. That form gives every algorithm what it needs without
special cases:

* second order: the gradient is taken with ``create_graph=True``, so the query loss can be
  differentiated through every step;
* first order: the gradient is taken without a graph, so ``d phi' / d theta`` is the
  identity and the query gradient at phi_K reaches theta as it is (FOMAML), while a
  learnable step size still gets ``-grad`` as its gradient (first-order Meta-SGD);
* a subset of parameters (ANIL): only they are differentiated in the inner loop, so the
  inner backward stops at the first adapted module instead of running through the encoder;
  the others enter every forward pass as theta itself and still get outer gradients;
* parameters the forward pass never reaches (efficientnet-b0 cut short) have no gradient
  (``allow_unused``) and simply stay at theta.

The step is written here rather than with higher's ``DifferentiableOptimizer``, which
differentiates every parameter in every inner step (no ANIL savings) and needs its
``override`` mechanism for learnable per-element or per-step rates. fp16 uses PyTorch's AMP
"gradient penalty" recipe: the loss is scaled before ``autograd.grad`` and the gradients
unscaled before the update (:class:`metaseg.meta.precision.Precision`).
"""

from __future__ import annotations

import collections
import contextlib
import fnmatch
from typing import Callable, Iterable, Optional, Sequence, Union

import higher
import higher.patch
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from metaseg.meta.losses import LossFn
from metaseg.meta.precision import Precision
from metaseg.utils.errors import ConfigError

Params = dict[str, torch.Tensor]
Rate = Union[float, torch.Tensor]
RateFn = Callable[[str], Rate]  # parameter name -> step size for one inner step


def full_precision(logits: torch.Tensor) -> torch.Tensor:
    """Losses are computed in fp32 at least: autocast logits are upcast, fp64 stays fp64."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _match_modules(root: nn.Module, segments: Sequence[str], prefix: str = "") -> list[str]:
    """Module (or parameter) names under ``root`` matching dotted glob ``segments``.

    A segment is an ``fnmatch`` pattern over child names, or a negative integer counting
    children from the end (``decoder.blocks.-1`` is the decoder's last block whatever its
    length). The last segment may also name a parameter (``segmentation_head.0.bias``).
    """
    head, rest = segments[0], segments[1:]
    children = list(root.named_children())
    if head.lstrip("-").isdigit() and head.startswith("-"):
        k = int(head)
        picked = [children[k]] if -len(children) <= k < 0 else []
    else:
        picked = [(n, m) for n, m in children if fnmatch.fnmatchcase(n, head)]
    found = []
    for name, module in picked:
        full = f"{prefix}{name}"
        found += _match_modules(module, rest, full + ".") if rest else [full]
    if not rest:
        found += [f"{prefix}{n}" for n, _ in root.named_parameters(recurse=False) if fnmatch.fnmatchcase(n, head)]
    return found


def select_parameters(model: nn.Module, patterns: Optional[Iterable[str]],
                      key: str = "meta.inner_params") -> list[str]:
    """Names of the trainable parameters adapted in the inner loop; ``None`` or ``[]``: all of them."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    patterns = list(patterns or [])
    if not patterns:
        return trainable
    chosen: set[str] = set()
    for pattern in patterns:
        hits = _match_modules(model, str(pattern).split("."))
        if not hits:
            top = ", ".join(n for n, _ in model.named_children())
            raise ConfigError(
                f"{key}: {pattern!r} matches no module or parameter of {type(model).__name__} "
                f"(its top-level modules: {top}; use dotted names, globs, or -1 for the last child)")
        for hit in hits:
            chosen |= {n for n in trainable if n == hit or n.startswith(hit + ".")}
    if not chosen:
        raise ConfigError(f"{key}={patterns} selects no trainable parameter")
    return [n for n in trainable if n in chosen]


def frozen_modules(model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    """The largest submodules with parameters, none of them adapted: their outputs are reusable."""
    adapted, found = set(names), []

    def visit(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            full = prefix + child_name
            params = [f"{full}.{n}" for n, _ in child.named_parameters()]
            if params and not adapted.intersection(params):
                found.append(child)
            elif params:
                visit(full + ".", child)

    visit("", model)
    return found


def _key(obj):
    """Identity of a call's arguments: tensors by object and in-place version, the rest by value."""
    if isinstance(obj, torch.Tensor):
        return ("t", id(obj), obj._version)
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, *map(_key, obj))
    if isinstance(obj, dict):
        return ("d", *((k, _key(v)) for k, v in sorted(obj.items())))
    return ("v", obj if isinstance(obj, (int, float, str, bool, type(None))) else id(obj))


class InnerLoop:
    """SGD steps on the parameters ``names`` of ``model``, as pure functions of fast weights.

    Inside :meth:`reusing`, a module none of whose parameters is adapted (ANIL's encoder and
    first decoder blocks) computes its output once per distinct input: the K inner steps
    on one support batch and the query evaluations share it, graph included, instead of
    recomputing the same encoder features K times. Modules downstream of an adapted one
    see new inputs at every step and run as usual. Plain MAML adapts everything and has no
    such module.
    """

    backend = "func"

    def __init__(self, model: nn.Module, loss: LossFn, precision: Precision, names: Sequence[str]):
        self.loss, self.precision = loss, precision
        self.names = list(names)
        self.set_model(model)

    def set_model(self, model: nn.Module) -> None:
        """Run on ``model`` from now on (a learner whose model is replaced, e.g. with a new head)."""
        self.model = model
        self.frozen = frozen_modules(model, self.names)

    @contextlib.contextmanager
    def reusing(self, keep: int = 2):
        """Within one task: memoise the frozen modules' outputs by input identity.

        Each module keeps its ``keep`` latest distinct inputs (the support and the query
        batch), so a frozen module downstream of an adapted one, whose input is new at
        every step, holds no more than that.
        """
        if not self.frozen:
            yield
            return
        caches: list[collections.OrderedDict] = []

        def memo(module: nn.Module):
            original, cache = module.forward, collections.OrderedDict()
            caches.append(cache)

            def forward(*args, **kwargs):
                key = (_key(args), _key(kwargs))
                if key in cache:
                    cache.move_to_end(key)
                else:  # the inputs are kept with the output, so their ids cannot be reused meanwhile
                    cache[key] = (original(*args, **kwargs), args, kwargs)
                    if len(cache) > keep:
                        cache.popitem(last=False)
                return cache[key][0]
            return forward

        for module in self.frozen:
            module.forward = memo(module)
        try:
            yield
        finally:
            for module in self.frozen:
                del module.forward
            for cache in caches:
                cache.clear()

    def _buffers(self) -> Params:
        """Copies of the model's buffers (BatchNorm running stats of a user's model, if any):
        a task's forward passes may update them in place, but never the stored model's."""
        return {n: b.clone() for n, b in self.model.named_buffers()}

    def theta(self) -> Params:
        """The model's own parameters: the start of every inner loop, differentiable."""
        return {**dict(self.model.named_parameters()), **self._buffers()}

    def loss_at(self, params: Params, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        with self.precision.autocast():
            logits = functional_call(self.model, params, (images,))
        return self.loss(full_precision(logits), masks)

    def step(self, params: Params, loss: torch.Tensor, rate: RateFn, *, create_graph: bool,
             retain_graph: bool = False, detach: bool = False) -> Params:
        """One SGD step ``phi - rate(name) * grad`` on ``self.names``; the others are kept as they are.

        ``detach`` starts the result as fresh leaves (adaptation at test time, Reptile), so
        nothing of the step's graph is kept.
        """
        targets = [params[n] for n in self.names]
        grads = torch.autograd.grad(self.precision.scaled(loss), targets, create_graph=create_graph,
                                    retain_graph=retain_graph or create_graph, allow_unused=True)
        grads = self.precision.unscale(list(grads))
        new = dict(params)
        for name, g in zip(self.names, grads):
            if g is None:  # not reached by the forward pass: stays at theta
                continue
            lr = rate(name)
            if detach:
                lr = lr.detach() if isinstance(lr, torch.Tensor) else lr
                new[name] = (params[name].detach() - lr * g.detach()).requires_grad_()
            else:
                # a constant rate: one fused kernel (and one autograd node) instead of a product and a difference
                new[name] = params[name] - lr * g if isinstance(lr, torch.Tensor) else \
                    torch.add(params[name], g, alpha=-float(lr))
        return new

    def checkpointed_step(self, params: Params, batch: tuple[torch.Tensor, torch.Tensor], rate: RateFn
                          ) -> tuple[Params, torch.Tensor]:
        """``loss_at`` then a second-order ``step``, recomputed in the outer backward instead of stored.

        Same values and meta-gradients as the two calls (``tests/unit/test_bench_scripts.py``); the
        graph kept per step shrinks to its inputs and outputs (the fast weights), so
        second-order memory stops growing with the activations of every step. Costs one more
        forward and inner backward per step. Run it outside :meth:`reusing`: a memoised
        output would be missing from the recomputation.
        """
        def run(fast: Params):
            loss = self.loss_at(fast, *batch)
            return self.step(fast, loss, rate, create_graph=True), loss

        return checkpoint(run, params, use_reentrant=False)

    def detached(self) -> Params:
        """A copy of theta to adapt without any meta-gradient: fresh leaves for the inner names."""
        out = self._buffers()
        for name, p in self.model.named_parameters():
            out[name] = p.detach().clone().requires_grad_() if name in self.names else p.detach()
        return out


class HigherInnerLoop(InnerLoop):
    """The inner loop on ``higher``: the model is run through higher's functional copy of it
    (``higher.monkeypatch``), called with the fast weights as ``params=``.

    The copy is made once per model; its buffers (BatchNorm running statistics of a user's
    model, if any) are refreshed from the model at the start of every inner loop, so a task's
    forward passes never reach the stored model's buffers. ``track_higher_grads=False``
    keeps higher from recording every fast-weight list it is given: the graph through the
    steps is the one the step builds, exactly as in the ``func`` backend.
    """

    backend = "higher"

    def set_model(self, model: nn.Module) -> None:
        super().set_model(model)
        self.param_names = [n for n, _ in model.named_parameters()]
        self.fmodel = higher.monkeypatch(model, copy_initial_weights=False, track_higher_grads=False)
        # higher's copy calls its own modules: memoise those matching the frozen ones. Their
        # fast weights are theta at every step, so an output depends on its input alone.
        names = {id(m): n for n, m in model.named_modules()}
        self.frozen = [self.fmodel.get_submodule(names[id(m)]) for m in self.frozen]

    def _buffers(self) -> Params:
        higher.patch.buffer_sync(self.model, self.fmodel)
        return {}

    def loss_at(self, params: Params, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        with self.precision.autocast():
            logits = self.fmodel(images, params=[params[n] for n in self.param_names])
        return self.loss(full_precision(logits), masks)


BACKENDS = {"higher": HigherInnerLoop, "func": InnerLoop}


def make_inner_loop(backend: str, model: nn.Module, loss: LossFn, precision: Precision,
                    names: Sequence[str]) -> InnerLoop:
    try:
        cls = BACKENDS[backend]
    except KeyError:
        raise ConfigError(f"meta.backend={backend!r} is not one of {', '.join(BACKENDS)}") from None
    return cls(model, loss, precision, names)
