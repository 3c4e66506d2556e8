"""iMAML, implicit MAML (Rajeswaran et al., 2019): the exact meta-gradient of a proximal inner
problem, with memory that does not grow with the number of inner steps.

Second-order MAML keeps the graph of every inner step, so its memory grows linearly in K;
first order drops the curvature. iMAML changes the inner problem so that its solution has a
gradient that needs no unrolling. Per task:

1. inner problem: phi* = argmin_phi L_support(phi) + lambda/2 ||phi - theta||^2, solved
   approximately by K SGD steps at alpha from theta, with no graph kept (``meta.inner_steps``,
   ``meta.inner_lr``, ``meta.imaml_lambda``). The proximal term is what makes phi* a smooth
   function of theta and keeps a long inner loop near theta; alpha * lambda < 2 is required
   (the pull alone would make SGD diverge), alpha * (lambda + curvature) < 2 for convergence;
2. implicit meta-gradient: at a stationary point, grad L_support(phi*) + lambda (phi* - theta) = 0;
   differentiating gives d phi*/d theta = (I + H/lambda)^{-1}, H the Hessian of L_support at
   phi*, so the meta-gradient is g = (I + H/lambda)^{-1} grad L_query(phi*). It is solved by
   conjugate gradient, ``meta.cg_steps`` Hessian-vector products (double backward through one
   support forward pass), on ((1 + cg_damping) I + H/lambda) g = grad L_query; damping > 0
   keeps the system positive definite where the support loss is not convex;
3. the outer step is every algorithm's (:mod:`metaseg.meta.base`): the task's objective is a
   surrogate whose value is the query loss and whose gradient with respect to theta is g, so
   averaging over tasks, fp16 scaling, clipping, torchrun's ``grad_sync`` and skipping
   non-finite tasks work unchanged.

Memory is one support graph for the Hessian-vector products, whatever K. Time per task: K
plain steps, the query pass, one support pass whose gradient keeps its graph, and cg_steps
Hessian-vector products (a double backward each). g is exact only if phi_K is the proximal
solution: the logged ``inner_grad_norm`` (norm of the regularised support gradient at phi_K)
says how far it is, ``cg_residual`` (||b - A g|| / ||b||) how well CG solved the system, and
``cg_negative_curvature`` that CG met a direction where A is not positive definite (phi_K is
not a minimum, or lambda is small for the network's curvature): CG then stops with the iterate
so far (the query gradient itself at the first iteration). Raise ``meta.cg_damping`` or
``meta.imaml_lambda`` if that is frequent.

Precision: the K inner steps and the query gradient run under the run's autocast (fp16 with
the inner-loop scaling of :mod:`metaseg.meta.precision`); the Hessian-vector products and CG
run in float32 without autocast (at least the parameters' dtype), since a half-precision
double backward would underflow and CG's recurrences need the precision.

Parameters outside ``meta.inner_params`` (ANIL-style) stay theta in the inner problem and get
their exact implicit gradient too: d L_query/d w - H_{w,phi} g / lambda, one more double
backward through the same graph. ``meta.first_order`` (or the fallback for encoders without
second derivatives) uses g = grad L_query(phi_K): no Hessian-vector products.

Adaptation at evaluation (``adapt``, ``metaseg-eval``, ``metaseg-predict``, the monitor) runs
the same proximal inner loop towards the model's weights, with ``eval.adapt_steps`` /
``eval.adapt_lr`` replacing K and alpha and lambda kept: theta is meta-learned so that the
proximal solution scores well, and a long adaptation stays near it as in training.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import nn

from metaseg.meta.capability import raise_if_second_order_failure
from metaseg.meta.inner import Params
from metaseg.meta.learner import Batch
from metaseg.meta.maml import MAML
from metaseg.meta.precision import Precision
from metaseg.utils.errors import ConfigError

Vector = list[torch.Tensor]


def _dot(a: Vector, b: Vector) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def conjugate_gradient(matvec: Callable[[Vector], Vector], b: Vector, steps: int) -> tuple[Vector, dict]:
    """Solve ``matvec(x) = b`` for a symmetric positive definite operator by at most ``steps`` CG iterations.

    Starts at x = 0; stops early once the residual is at round-off level. Returns x and
    statistics: ``cg_residual`` (relative residual ||b - A x|| / ||b|| of the recurrence),
    ``cg_iterations`` and ``cg_negative_curvature`` (1.0: a direction with p^T A p <= 0 ended
    the solve; x is then the iterate before it, or b itself at the first iteration). A
    non-finite b is returned as it is, with a NaN residual.
    """
    x = [torch.zeros_like(v) for v in b]
    r = [v.clone() for v in b]
    p = [v.clone() for v in b]
    rs = _dot(r, r)
    b_norm = float(rs.sqrt())
    stats = {"cg_residual": 0.0, "cg_iterations": 0.0, "cg_negative_curvature": 0.0}
    if b_norm == 0.0:
        return x, stats
    if not torch.isfinite(rs):  # fp16 overflow: b passes through, so the GradScaler sees it and skips the step
        return [v.clone() for v in b], {**stats, "cg_residual": float("nan")}
    floor = (torch.finfo(b[0].dtype).eps * b_norm) ** 2
    for i in range(steps):
        ap = matvec(p)
        curvature = _dot(p, ap)
        if not torch.isfinite(curvature):
            return x, {**stats, "cg_residual": float("nan")}
        if not curvature > 0:
            stats["cg_negative_curvature"] = 1.0
            if i == 0:  # no step taken: the query gradient itself, whose residual A b gives at once
                res = [bi - ai for bi, ai in zip(b, ap)]
                return [v.clone() for v in b], {**stats, "cg_residual": float(_dot(res, res).sqrt()) / b_norm}
            break
        step = rs / curvature
        x = [xi + step * pi for xi, pi in zip(x, p)]
        r = [ri - step * api for ri, api in zip(r, ap)]
        rs_new = _dot(r, r)
        stats["cg_iterations"] = float(i + 1)
        if float(rs_new) <= floor:
            rs = rs_new
            break
        p = [ri + (rs_new / rs) * pi for ri, pi in zip(r, p)]
        rs = rs_new
    stats["cg_residual"] = float(rs.sqrt()) / b_norm
    return x, stats


class IMAML(MAML):
    """Implicit MAML: K proximal SGD steps without a graph, then the implicit meta-gradient by CG."""

    name = "imaml"
    has_meta_gradient = False  # implicit: the gradient of the proximal solution, not through the steps

    @classmethod
    def options(cls, m) -> dict:
        return {**super().options(m), "lam": m.imaml_lambda, "cg_steps": m.cg_steps, "cg_damping": m.cg_damping}

    def __init__(self, model: nn.Module, *, lam: float = 2.0, cg_steps: int = 5, cg_damping: float = 0.0,
                 **kwargs):
        for key, on in (("multi_step_loss", kwargs.get("multi_step_loss")),
                        ("checkpoint_inner", kwargs.get("checkpoint_inner")),
                        ("learn_inner_lr", kwargs.get("step_sizes") is not None)):
            if on:
                raise ConfigError(f"meta.{key} has no effect on imaml (its meta-gradient is implicit, not through "
                                  f"the inner steps); set meta.{key}=false")
        if not lam > 0:
            raise ConfigError(f"meta.imaml_lambda={lam} must be > 0 (the proximal strength)")
        if not kwargs.get("inner_lr", 0) * lam < 2:
            raise ConfigError(f"meta.inner_lr * meta.imaml_lambda = {kwargs['inner_lr'] * lam:g} must be < 2: the "
                              f"proximal pull alone makes the inner SGD diverge; lower meta.inner_lr or "
                              f"meta.imaml_lambda")
        if cg_steps < 1:
            raise ConfigError(f"meta.cg_steps={cg_steps} must be >= 1 (for no CG at all set meta.first_order=true)")
        if cg_damping < 0:
            raise ConfigError(f"meta.cg_damping={cg_damping} must be >= 0")
        super().__init__(model, **kwargs)
        self.lam, self.cg_steps, self.cg_damping = float(lam), int(cg_steps), float(cg_damping)

    # -- the proximal inner loop, shared by training and adaptation --------------------
    def _inner_chunk(self, fast: Params, images: torch.Tensor, masks: torch.Tensor, ks: range,
                     lr: Optional[float], seen: list) -> Params:
        """Inner steps on L_support + lambda/2 ||phi - theta||^2 from ``fast``; no graph kept.

        ``seen`` receives the support loss alone, comparable with the other algorithms' curves.
        """
        if not ks:
            return fast
        anchor = {n: p.detach() for n, p in self.model.named_parameters() if n in self.inner.names}
        with torch.enable_grad(), self.inner.reusing():
            for k in ks:
                loss = self.inner.loss_at(fast, images, masks)
                seen.append(loss.detach())
                prox = sum((fast[n] - anchor[n]).pow(2).sum() for n in self.inner.names)
                fast = self.inner.step(fast, loss + 0.5 * self.lam * prox, self.rate(k, lr), create_graph=False,
                                       detach=True)
        return fast

    @contextlib.contextmanager
    def _float32(self):
        """The inner loop's forward passes without autocast (Hessian-vector products, CG)."""
        saved = self.inner.precision
        self.inner.precision = Precision("32", saved.device_type)
        try:
            yield
        finally:
            self.inner.precision = saved

    # -- one task's objective --------------------------------------------------------------
    def outer_loss(self, support: Batch, query: Batch, *, step: Optional[int] = None) -> torch.Tensor:
        """Query loss at phi_K, as a surrogate whose ``backward()`` leaves the implicit meta-gradient in theta."""
        first_order = self.is_first_order(self.step if step is None else step)
        losses: list[float] = []
        phi = self.adapted_params(*support, losses=losses)
        self.model.train()
        theta = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        inner = [n for n in self.inner.names if n in theta]
        others = [n for n in theta if n not in set(inner)]
        live = {**phi, **{n: theta[n] for n in others}}  # outside the inner loop: theta itself, differentiable
        with torch.enable_grad():
            q = self.inner.loss_at(live, *query)
            grads = torch.autograd.grad(self.precision.scaled(q), [phi[n] for n in inner] + [theta[n] for n in others],
                                        allow_unused=True)
        grads = self.precision.unscale(list(grads))
        b = dict(zip(inner + others, grads))
        stats: dict[str, float] = {}
        if not first_order:
            with raise_if_second_order_failure():
                solved, stats = self._implicit(live, support, inner, others, b, theta)
            b.update(solved)
        self.last_stats = {"query_loss_after": float(q.detach()), **stats}
        if losses:
            self.last_stats.update(support_loss_before=losses[0], support_loss_after=losses[-1])
        surrogate = sum(((theta[n] - theta[n].detach()) * g.to(theta[n].dtype)).sum()
                        for n, g in b.items() if g is not None)
        return q.detach() + surrogate

    def _implicit(self, live: Params, support: Batch, inner: list[str], others: list[str],
                  b: dict, theta: dict) -> tuple[dict, dict]:
        """g = ((1 + damping) I + H/lambda)^{-1} b on the inner parameters by CG (float32 or wider),
        and the exact gradient of the parameters outside the inner loop; with their statistics."""
        with self._float32(), torch.enable_grad():
            s = self.inner.loss_at(live, *support)
            gs = torch.autograd.grad(s, [live[n] for n in inner], create_graph=True, allow_unused=True)
        # parameters the support loss does not reach stay at theta in the inner loop: their g is b
        used = [i for i, g in enumerate(gs) if g is not None]
        if not used:
            return {}, {}
        names = [inner[i] for i in used]
        wide = [torch.promote_types(live[n].dtype, torch.float32) for n in names]
        phis = [live[n] for n in names]
        grads = [gs[i] for i in used]
        curved = [g.requires_grad for g in grads]

        def hvp(v: Vector) -> Vector:
            outs = [(g, vi.to(g.dtype)) for g, vi, c in zip(grads, v, curved) if c]
            if not outs:
                return [torch.zeros_like(vi) for vi in v]
            hv = torch.autograd.grad([g for g, _ in outs], phis, grad_outputs=[vi for _, vi in outs],
                                     retain_graph=True, allow_unused=True)
            return [torch.zeros_like(vi) if h is None else h.to(vi.dtype) for h, vi in zip(hv, v)]

        def matvec(v: Vector) -> Vector:
            return [(1.0 + self.cg_damping) * vi + hi / self.lam for vi, hi in zip(v, hvp(v))]

        rhs = [torch.zeros_like(p, dtype=dt) if b[n] is None else b[n].to(dt) for n, p, dt in zip(names, phis, wide)]
        x, stats = conjugate_gradient(matvec, rhs, self.cg_steps)
        with torch.no_grad():
            stationarity = [g.detach().to(dt) + self.lam * (p.detach().to(dt) - theta[n].detach().to(dt))
                            for g, p, n, dt in zip(grads, phis, names, wide)]
            stats["inner_grad_norm"] = float(torch.sqrt(_dot(stationarity, stationarity)))
        solved = dict(zip(names, x))
        if others and any(curved):
            pairs = [(g, xi.to(g.dtype)) for g, xi, c in zip(grads, x, curved) if c]
            mixed = torch.autograd.grad([g for g, _ in pairs], [theta[n] for n in others],
                                        grad_outputs=[xi for _, xi in pairs], allow_unused=True)
            for n, m in zip(others, mixed):
                if m is not None:
                    solved[n] = m.detach() * (-1.0 / self.lam) if b[n] is None else b[n] - m.detach() / self.lam
        return solved, stats
