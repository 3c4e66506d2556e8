"""iMAML: the proximal solution and implicit meta-gradient against closed forms and finite
differences (float64), CG and its logging, both backends, precision, the outer-step paths
(budget, grad_sync). ``metaseg-train meta=imaml`` at smoke size and its resume:
tests/integration/test_imaml.py."""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metaseg.meta import ALGORITHMS, IMAML, OuterSettings, Precision
from metaseg.meta.from_config import make_learner, validate_meta
from metaseg.meta.imaml import conjugate_gradient
from metaseg.models import set_norm
from metaseg.utils.errors import ConfigError
from tests.helpers import MB, QUERY, SHOTS, close, fp16_on_cpu, loss_fn, one_step, task
from tests.helpers import budget_count as _count

F64 = torch.float64


# -- (a) a quadratic inner problem: everything in closed form ------------------------------
N, M, LAM = 6, 3, 2.0


def _spd(n, lo, hi, g):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return q @ torch.diag(torch.linspace(lo, hi, n, dtype=F64)) @ q.T


class Quadratic(nn.Module):
    """phi (adapted) and w (not): L_s = 1/2 phi'A phi - (c + C w)'phi, L_q = 1/2 (phi - t)'B(phi - t) + e'w.

    The "logits" are the parameters themselves; the "mask" says which loss (0 support, 1 query).
    """

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.A, self.B = _spd(N, 0.5, 3.0, g), _spd(N, 0.2, 1.5, g)
        self.c, self.t = torch.randn(N, generator=g, dtype=F64), torch.randn(N, generator=g, dtype=F64)
        self.C, self.e = torch.randn(N, M, generator=g, dtype=F64), torch.randn(M, generator=g, dtype=F64)
        self.phi = nn.Parameter(torch.randn(N, generator=g, dtype=F64))
        self.w = nn.Parameter(torch.randn(M, generator=g, dtype=F64))

    def forward(self, x):
        return torch.cat([self.phi, self.w])[None].expand(x.shape[0], -1)

    def loss(self, out, y):
        phi, w = out[0, :N], out[0, N:]
        if int(y[0]) == 0:
            return 0.5 * phi @ self.A @ phi - (self.c + self.C @ w) @ phi
        return 0.5 * (phi - self.t) @ self.B @ (phi - self.t) + self.e @ w


@pytest.mark.parametrize("backend", ["higher", "func"])
def test_quadratic_proximal_solution_and_implicit_gradient_match_the_closed_form(backend):
    model = Quadratic()
    x = torch.zeros(1, 1, dtype=F64)
    support, query = (x, torch.zeros(1, dtype=torch.long)), (x, torch.ones(1, dtype=torch.long))
    # alpha (lambda + max eig A) = 1: every inner step contracts by <= 0.5, so 200 steps reach round-off
    learner = IMAML(model, lam=LAM, cg_steps=20, inner_lr=0.2, inner_steps=200, loss=model.loss,
                    inner_params=["phi"], backend=backend)
    objective = learner.outer_loss(support, query)
    objective.backward()
    theta, w = model.phi.detach(), model.w.detach()
    reg = model.A + LAM * torch.eye(N, dtype=F64)
    star = torch.linalg.solve(reg, model.c + model.C @ w + LAM * theta)  # the proximal solution
    dq = model.B @ (star - model.t)
    g_theta = LAM * torch.linalg.solve(reg, dq)  # d phi*/d theta = lambda (A + lambda I)^{-1}
    g_w = model.C.T @ torch.linalg.solve(reg, dq) + model.e  # through phi*, plus the direct term
    phi_k = learner.adapted_params(*support)["phi"].detach()
    errors = (float((phi_k - star).abs().max()), float((model.phi.grad - g_theta).abs().max()),
              float((model.w.grad - g_w).abs().max()))
    assert max(errors) < 1e-9, errors  # measured ~2e-16
    assert float(objective.detach()) == pytest.approx(float(model.loss(torch.cat([star, w])[None], query[1])),
                                                      abs=1e-12)
    assert learner.last_stats["cg_residual"] < 1e-12 and learner.last_stats["cg_iterations"] <= N
    assert learner.last_stats["inner_grad_norm"] < 1e-12


# -- (b) a tiny network: finite differences at the converged inner solution ----------------
def smooth_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.Conv2d(4, 3, 1))
    return set_norm(net, "batch").to(F64)


def query_loss_at_solution(learner, support, query):
    """L_query at the inner solution from the model's current theta (re-solved from scratch)."""
    phi = learner.adapted_params(*support)
    params = {**phi, **{n: p for n, p in learner.model.named_parameters() if n not in learner.inner.names}}
    with torch.no_grad():
        return float(learner.inner.loss_at(params, *query))


@pytest.mark.parametrize("inner_params", [None, ["3"]])  # all adapted | the head only (w: the mixed term)
def test_implicit_gradient_matches_finite_differences_of_the_solved_query_loss(inner_params):
    support, query = task(n=2, size=6)
    model = smooth_net()
    learner = IMAML(model, lam=1.0, cg_steps=100, inner_lr=0.3, inner_steps=200, loss=loss_fn,
                    inner_params=inner_params)
    learner.outer_loss(support, query).backward()
    assert learner.last_stats["inner_grad_norm"] < 1e-10 and learner.last_stats["cg_residual"] < 1e-10
    params, eps, worst = dict(model.named_parameters()), 1e-5, 0.0
    for name, idx in (("0.weight", (1, 2, 0, 1)), ("1.weight", (2,)), ("3.weight", (2, 1, 0, 0)), ("3.bias", (0,))):
        p, values = params[name], []
        for sign in (1, -1):
            with torch.no_grad():
                p[idx] += sign * eps
            values.append(query_loss_at_solution(learner, support, query))
            with torch.no_grad():
                p[idx] -= sign * eps
        fd = (values[0] - values[1]) / (2 * eps)
        assert abs(fd) > 1e-4, name  # a coordinate that matters
        worst = max(worst, abs(float(p.grad[idx]) - fd))
    assert worst < 1e-8, worst  # measured ~2e-11


# -- (c) conjugate gradient and its statistics ------------------------------------------------
def test_conjugate_gradient_solves_spd_systems_and_stops_at_negative_curvature():
    g = torch.Generator().manual_seed(1)
    a = _spd(8, 0.1, 10.0, g)
    b = [torch.randn(5, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)]

    def matvec(v, mat=a):
        out = mat @ torch.cat(v)
        return [out[:5], out[5:]]

    exact = torch.linalg.solve(a, torch.cat(b))
    residuals = []
    for steps in (1, 3, 8):
        x, stats = conjugate_gradient(matvec, b, steps)
        r = torch.cat(b) - a @ torch.cat(x)
        assert stats["cg_residual"] == pytest.approx(float(r.norm() / torch.cat(b).norm()), rel=1e-6, abs=1e-13)
        residuals.append(stats["cg_residual"])
    assert residuals[-1] < 1e-10 and residuals[0] > 1e-2
    assert torch.allclose(torch.cat(x), exact, atol=1e-10)
    indefinite = torch.diag(torch.tensor([1.0, 2.0, 3.0, -5.0, 1.0, 1.0, 1.0, 1.0], dtype=F64))
    x, stats = conjugate_gradient(lambda v: matvec(v, indefinite), b, 8)
    assert stats["cg_negative_curvature"] == 1.0 and all(torch.isfinite(t).all() for t in x)
    overflow = [b[0], torch.full((3,), float("inf"), dtype=F64)]  # passed on, for the GradScaler to see
    x, stats = conjugate_gradient(matvec, overflow, 8)
    assert torch.isinf(x[1]).all() and stats["cg_residual"] != stats["cg_residual"]


def test_cg_residual_is_logged_and_falls_with_more_iterations():
    support, query = task(n=2, size=6)
    residual = {}
    for steps in (1, 40):
        learner = IMAML(smooth_net(), lam=1.0, cg_steps=steps, inner_lr=0.3, inner_steps=20, loss=loss_fn,
                        outer=OuterSettings(meta_batch=1))
        opt = torch.optim.SGD(learner.parameters(), lr=0.0)
        stats = learner.meta_step(_Fixed(support, query), opt, Precision().grad_scaler(), 1)
        assert {"cg_residual", "cg_iterations", "cg_negative_curvature", "inner_grad_norm"} <= set(stats)
        residual[steps] = stats["cg_residual"]
    assert residual[40] < 1e-8 < residual[1]


# -- one step and the shared outer-step paths -------------------------------------------------
class _Fixed:
    """A sampler handing out given tasks in turn; ``sample_batch`` when sharded by hand."""

    def __init__(self, support, query, *more):
        self.tasks = [(support, query), *more]
        self.i = 0

    def sample(self):
        support, query = self.tasks[self.i % len(self.tasks)]
        self.i += 1
        return type("Task", (), {"support": support, "query": query, "to": lambda t, d: t})()


def test_backends_agree_on_meta_gradient_and_adaptation():
    support, query = task()
    out = {}
    for backend in ("higher", "func"):
        learner = IMAML(smooth_net(), lam=2.0, cg_steps=4, inner_lr=0.2, inner_steps=3, loss=loss_fn, backend=backend)
        learner.outer_loss(support, query).backward()
        adapted = learner.adapt(*support)
        out[backend] = [p.grad.clone() for p in learner.model.parameters()] + list(adapted.parameters())
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(out["higher"], out["func"]))


def test_adaptation_is_the_proximal_inner_loop():
    support, _ = task()
    model = smooth_net()
    learner = IMAML(model, lam=3.0, inner_lr=0.1, inner_steps=4, loss=loss_fn)
    theta = {n: p.detach() for n, p in model.named_parameters()}
    fast = {n: p.clone().requires_grad_() for n, p in theta.items()}
    for _ in range(6):  # reference: SGD on L_s + lambda/2 ||phi - theta||^2, eval.adapt_steps=6, adapt_lr=0.05
        loss = loss_fn(functional_call(model, fast, (support[0],)), support[1])
        loss = loss + 1.5 * sum((fast[n] - theta[n]).pow(2).sum() for n in fast)
        grads = torch.autograd.grad(loss, list(fast.values()))
        fast = {n: (p - 0.05 * g).detach().requires_grad_() for (n, p), g in zip(fast.items(), grads)}
    adapted = dict(learner.adapt(*support, steps=6, lr=0.05).named_parameters())
    assert all(torch.allclose(adapted[n], fast[n], rtol=1e-10, atol=1e-12) for n in fast)
    assert all(torch.equal(p, theta[n]) for n, p in model.named_parameters())  # theta untouched


def test_sharded_meta_batch_through_grad_sync_equals_one_process():
    """Two "ranks" of one task each, their gradients summed by grad_sync, take the step one process takes."""
    t1, t2 = task(seed=1), task(seed=2)

    def learner():
        lr = IMAML(smooth_net(), lam=2.0, cg_steps=3, inner_lr=0.2, inner_steps=2, loss=loss_fn,
                   outer=OuterSettings(lr=0.1, meta_batch=2))
        return lr, torch.optim.SGD(lr.parameters(), lr=0.1), Precision().grad_scaler()

    one, opt, scaler = learner()
    one.meta_step(_Fixed(*t1, t2), opt, scaler, 1)

    other, _, _ = learner()  # rank 1's share: t2, weighted 1/meta_batch like every task
    outcome = other.task_step(_Fixed(*t2).sample(), scaler, 0.5)
    assert outcome.used
    theirs = [p.grad.clone() for p in other.parameters()]

    class Sync:
        def reduce(self, params, n_used, n_tasks):
            for p, g in zip(params, theirs):
                p.grad += g
            return n_used + 1, n_tasks + 1

    rank0, opt0, scaler0 = learner()
    rank0.grad_sync = Sync()

    class Share(_Fixed):
        def sample_batch(self, n):
            return [self.sample()]

    rank0.meta_step(Share(*t1), opt0, scaler0, 1)
    for a, b in zip(one.parameters(), rank0.parameters()):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_budget_counts_every_hessian_vector_product_as_a_support_backward():
    # per task: K support forwards and backwards, the query forward and backward, one support forward
    # whose gradient is kept (a backward) and cg_steps Hessian-vector products (a backward each)
    k, cg = 2, 5
    assert _count("imaml", k, False) == {"forward_images": MB * (k * SHOTS + QUERY + SHOTS),
                                         "backward_images": MB * (k * SHOTS + QUERY + (1 + cg) * SHOTS),
                                         "outer_steps": 1}


def test_hessian_vector_products_run_in_float32_under_autocast():
    from metaseg.config import ModelConfig
    from metaseg.data.synthetic import synthetic_task
    from metaseg.models import build_model
    torch.manual_seed(0)
    model = build_model(ModelConfig(extra={"encoder_depth": 3, "decoder_channels": [16, 8, 8]}), 4)
    support, query = synthetic_task()
    grads = {}
    for mode in ("32", "bf16"):
        learner = IMAML(copy.deepcopy(model), cg_steps=3, inner_lr=0.05, inner_steps=1, precision=Precision(mode))
        dtypes = []
        head = learner.inner.fmodel.segmentation_head
        hook = head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        learner.outer_loss(support, query).backward()
        hook.remove()
        # the inner step and the query under autocast, the one support pass of the products in float32
        assert dtypes == ([torch.float32] * 3 if mode == "32" else [torch.bfloat16] * 2 + [torch.float32])
        grads[mode] = torch.cat([p.grad.flatten() for p in learner.parameters()])
    cos = float(grads["bf16"] @ grads["32"] / grads["bf16"].norm() / grads["32"].norm())
    assert torch.isfinite(grads["bf16"]).all() and cos > 0.9, cos  # K = 1, as the other algorithms: 0.95


def test_fp16_meta_step_with_grad_scaler_follows_fp32():
    if not fp16_on_cpu():
        pytest.skip("this torch has no fp16 autocast on CPU")
    d32, _, _, _ = one_step("imaml", "32")
    d16, stats, _, scaler = one_step("imaml", "16")
    _, cos, ratio = close(d16, d32)
    assert torch.isfinite(d16).all() and cos > 0.95 and abs(ratio - 1) < 0.1, (cos, ratio)
    assert stats["tasks_skipped"] == 0 and stats["loss_scale"] == scaler.get_scale()
    # a scale that overflows: the inner loop restarts at lower scales (as adapt does) and the step still follows fp32
    d, stats, learner, _ = one_step("imaml", "16", scale=2.0**40)
    _, cos, ratio = close(d, d32)
    assert cos > 0.95 and abs(ratio - 1) < 0.1 and learner.guard.total == 0 and stats["tasks_skipped"] == 0


# -- configuration -----------------------------------------------------------------------------
def test_config_keys_reach_the_learner_and_useless_options_are_refused(tiny_cfg):
    cfg = tiny_cfg("meta=imaml", "meta.imaml_lambda=0.5", "meta.cg_steps=7", "meta.cg_damping=0.1",
                   "meta.backend=func")
    learner = make_learner(smooth_net(), cfg.meta, Precision())
    assert isinstance(learner, IMAML) and (learner.lam, learner.cg_steps, learner.cg_damping) == (0.5, 7, 0.1)
    assert learner.inner.backend == "func" and ALGORITHMS["imaml"](smooth_net(), inner_lr=0.1,
                                                                   inner_steps=1).name == "imaml"
    for override in ("meta.learn_inner_lr=true", "meta.multi_step_loss=true", "meta.first_order_until=3"):
        with pytest.raises(ConfigError, match="meta.algorithm=imaml"):
            validate_meta(tiny_cfg("meta=imaml", override).meta)
    for override, message in (("meta.checkpoint_inner=true", "meta.checkpoint_inner has no effect on imaml"),
                              ("meta.imaml_lambda=0", r"meta.imaml_lambda=0.0 must be > 0"),
                              ("meta.cg_steps=0", "meta.cg_steps=0 must be >= 1"),
                              ("meta.cg_damping=-1", r"meta.cg_damping=-1.0 must be >= 0"),
                              ("meta.imaml_lambda=20", r"meta.inner_lr \* meta.imaml_lambda = 2 must be < 2")):
        with pytest.raises(ConfigError, match=message):
            make_learner(smooth_net(), tiny_cfg("meta=imaml", override).meta, Precision())


def test_first_order_imaml_is_the_query_gradient_at_the_proximal_solution():
    support, query = task()
    learner = IMAML(smooth_net(), lam=2.0, inner_lr=0.2, inner_steps=3, loss=loss_fn, first_order=True)
    learner.outer_loss(support, query).backward()
    phi = learner.adapted_params(*support)
    ref = torch.autograd.grad(learner.inner.loss_at(phi, *query), [phi[n] for n in learner.inner.names])
    assert all(torch.allclose(p.grad, r, rtol=1e-12, atol=1e-14) for p, r in zip(learner.parameters(), ref))
    assert "cg_residual" not in learner.last_stats
