"""Each algorithm's update against an independent computation, on a tiny float64 model.

The references are written from scratch with ``torch.func.functional_call`` and
``torch.autograd.grad`` (or plain ``torch.optim`` on copies of the model): no metaseg
inner-loop code. Tolerances are float64 round-off.
"""

import copy
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.func import functional_call

from metaseg.config import MetaConfig
from metaseg.meta import (ALGORITHMS, ANIL, ERM, FOMAML, IMAML, MAML, MLDG, DivergenceError, MetaLearner, MetaSGD,
                          OuterSettings, Reptile)
from metaseg.meta.from_config import validate_meta
from metaseg.meta.inner import select_parameters
from metaseg.meta.mamlpp import first_order_at, multi_step_weights, outer_lr_at
from metaseg.utils.errors import ConfigError
from tests.helpers import loss_fn, task, tiny_net

ALPHA = 0.3


class FixedTasks:
    """A sampler that hands out the given tasks in turn (``.sample()`` like ``TaskSampler``)."""

    def __init__(self, *tasks):
        self.tasks, self.i = list(tasks), 0

    def sample(self):
        t = self.tasks[self.i % len(self.tasks)]
        self.i += 1
        return t


class T:
    def __init__(self, support, query):
        self.support, self.query = support, query

    def to(self, device):
        return self


def leaves(model):
    return {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}


def loss_at(model, params, batch):
    return loss_fn(functional_call(model, params, (batch[0],)), batch[1])


def unroll(model, params, batch, steps, rate, *, create_graph, names=None):
    """Reference SGD: a list of the fast weights after each of ``steps`` steps; ``rate(k, name)``."""
    names = list(params) if names is None else names
    fast, out = dict(params), []
    for k in range(steps):
        grads = torch.autograd.grad(loss_at(model, fast, batch), [fast[n] for n in names], create_graph=create_graph)
        fast = {**fast, **{n: fast[n] - rate(k, n) * g for n, g in zip(names, grads)}}
        out.append(fast)
    return out


def grads_of(learner, support, query, **kw):
    learner.model.zero_grad(set_to_none=True)
    loss = learner.outer_loss(support, query, **kw)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in learner.model.named_parameters()}


def assert_close(got: dict, ref: dict, rtol=1e-7, atol=1e-10):
    assert got.keys() == ref.keys()
    for n in ref:
        assert torch.allclose(got[n], ref[n], rtol=rtol, atol=atol), n


# -- FOMAML -------------------------------------------------------------------------------
def test_fomaml_is_query_gradient_at_adapted_weights():
    model = tiny_net()
    support, query = task()
    learner = FOMAML(model, inner_lr=ALPHA, inner_steps=3)
    assert learner.first_order and learner.name == "fomaml"
    loss, got = grads_of(learner, support, query)
    phi = unroll(model, leaves(model), support, 3, lambda k, n: ALPHA, create_graph=False)[-1]
    phi = {n: p.detach().requires_grad_() for n, p in phi.items()}
    q = loss_at(model, phi, query)
    ref = dict(zip(phi, torch.autograd.grad(q, list(phi.values()))))
    assert loss.item() == pytest.approx(q.item(), rel=1e-12)
    assert_close(got, ref)


# -- ANIL ---------------------------------------------------------------------------------
def test_anil_inner_loop_adapts_only_the_head_yet_all_parameters_get_meta_gradients():
    model = tiny_net()
    support, query = task()
    learner = ANIL(model, inner_lr=ALPHA, inner_steps=2, inner_params=["-1"])  # the last child: the 1x1 head
    assert learner.inner_names == ["6.weight", "6.bias"]
    adapted = dict(learner.adapt(*support).named_parameters())
    for n, p in model.named_parameters():
        assert torch.equal(adapted[n], p) != n.startswith("6."), n  # head moved, the rest did not

    _, got = grads_of(learner, support, query)
    params = leaves(model)
    phi = unroll(model, params, support, 2, lambda k, n: ALPHA, create_graph=True, names=["6.weight", "6.bias"])[-1]
    assert all(phi[n] is params[n] for n in params if not n.startswith("6."))
    ref = dict(zip(params, torch.autograd.grad(loss_at(model, phi, query), list(params.values()))))
    assert_close(got, ref)
    assert all(got[n].abs().sum() > 0 for n in got)  # the encoder is meta-learned too


def test_anil_matches_finite_differences():
    model = tiny_net()
    support, query = task()
    learner = ANIL(model, inner_lr=ALPHA, inner_steps=2, inner_params=["6"])
    _, got = grads_of(learner, support, query)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(5)
    eps = 1e-6
    for _ in range(2):
        d = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in base.items()}

        def f(sign):
            shifted = {n: (base[n] + sign * eps * d[n]).requires_grad_() for n in base}
            phi = unroll(model, shifted, support, 2, lambda k, n: ALPHA, create_graph=False,
                         names=["6.weight", "6.bias"])
            return loss_at(model, phi[-1], query).item()
        numeric = (f(1) - f(-1)) / (2 * eps)
        analytic = sum((got[n] * d[n]).sum() for n in base).item()
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def test_inner_params_patterns_on_an_smp_unet():
    from metaseg.config import ModelConfig
    from metaseg.models import build_model
    model = build_model(ModelConfig(extra={"encoder_depth": 3, "decoder_channels": [16, 8, 8]}), 3)
    names = select_parameters(model, ["decoder.blocks.-1", "segmentation_head"])
    assert names and all(n.startswith(("decoder.blocks.2.", "segmentation_head.")) for n in names)
    assert any(n.startswith("segmentation_head.") for n in names)
    assert select_parameters(model, ["decoder.blocks.*"]) == [n for n, _ in model.named_parameters()
                                                             if n.startswith("decoder.blocks.")]
    assert select_parameters(model, ["segmentation_head.0.bias"]) == ["segmentation_head.0.bias"]
    assert select_parameters(model, []) == [n for n, _ in model.named_parameters()]
    with pytest.raises(ConfigError, match=r"meta.inner_params: 'decoder.head' matches no module.*encoder, decoder"):
        select_parameters(model, ["decoder.head"])


# -- Meta-SGD and learned step sizes --------------------------------------------------------
@pytest.mark.parametrize("per_element,per_step", [(False, False), (True, False), (False, True)])
def test_metasgd_step_sizes_get_the_reference_meta_gradient(per_element, per_step):
    model = tiny_net()
    support, query = task()
    learner = MetaSGD(model, inner_lr=ALPHA, inner_steps=2, per_element=per_element, per_step=per_step)
    sizes = learner.step_sizes
    with torch.no_grad():  # distinct rates, so a mix-up of tensors or steps shows
        for i, v in enumerate(sizes.values):
            v.mul_(1 + 0.1 * i).add_(0.01 * torch.arange(v.numel(), dtype=v.dtype).view_as(v) / v.numel())
    assert len(learner.parameters()) == len(list(model.parameters())) * 2  # theta and one table per tensor
    for v in sizes.values:
        v.grad = None
    _, got = grads_of(learner, support, query)

    params = leaves(model)
    tables = {n: v.detach().clone().requires_grad_() for n, v in zip(sizes.names, sizes.values)}
    rate = lambda k, n: tables[n][min(k, tables[n].shape[0] - 1)]  # noqa: E731
    phi = unroll(model, params, support, 2, rate, create_graph=True)[-1]
    q = loss_at(model, phi, query)
    ref = torch.autograd.grad(q, list(params.values()) + list(tables.values()))
    assert_close(got, dict(zip(params, ref[: len(params)])))
    for v, r in zip(sizes.values, ref[len(params):]):
        assert v.grad is not None and v.grad.abs().sum() > 0
        assert torch.allclose(v.grad, r, rtol=1e-7, atol=1e-12)


def test_first_order_step_sizes_get_minus_query_gradient_dot_inner_gradient():
    model = tiny_net()
    support, query = task()
    learner = MetaSGD(model, inner_lr=ALPHA, inner_steps=2, first_order=True, per_step=True)
    grads_of(learner, support, query)
    params = leaves(model)
    traj_grads, fast = [], dict(params)
    for _ in range(2):  # plain SGD, recording the inner gradients
        g = dict(zip(fast, torch.autograd.grad(loss_at(model, fast, support), list(fast.values()))))
        traj_grads.append(g)
        fast = {n: (fast[n] - ALPHA * g[n]).detach().requires_grad_() for n in fast}
    dq = dict(zip(fast, torch.autograd.grad(loss_at(model, fast, query), list(fast.values()))))
    for name, table in zip(learner.step_sizes.names, learner.step_sizes.values):
        expected = torch.stack([-(dq[name] * traj_grads[k][name]).sum() for k in range(2)])
        assert torch.allclose(table.grad, expected, rtol=1e-7, atol=1e-12), name


def test_adapt_uses_learned_step_sizes_and_explicit_lr_replaces_them():
    model = tiny_net()
    support, _ = task()
    learner = MetaSGD(model, inner_lr=ALPHA, inner_steps=2, per_element=True)
    with torch.no_grad():
        for v in learner.step_sizes.values:
            v.uniform_(0.05, 0.4, generator=torch.Generator().manual_seed(2))
    adapted = dict(learner.adapt(*support).named_parameters())
    rates = dict(zip(learner.step_sizes.names, (v.detach()[0] for v in learner.step_sizes.values)))
    ref = unroll(model, leaves(model), support, 2, lambda k, n: rates[n], create_graph=False)[-1]
    assert_close(adapted, {n: p.detach() for n, p in ref.items()}, atol=1e-12)
    plain = dict(learner.adapt(*support, lr=ALPHA).named_parameters())
    ref = unroll(model, leaves(model), support, 2, lambda k, n: ALPHA, create_graph=False)[-1]
    assert_close(plain, {n: p.detach() for n, p in ref.items()}, atol=1e-12)


def test_meta_state_round_trip_and_mismatch():
    learner = MetaSGD(tiny_net(), inner_lr=ALPHA, inner_steps=2)
    with torch.no_grad():
        learner.step_sizes.values[0].fill_(0.123)
    state = learner.meta_state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state["step_sizes"].values())
    other = MetaSGD(tiny_net(), inner_lr=ALPHA, inner_steps=2)
    other.load_meta_state_dict(state)
    assert other.step_sizes.values[0].item() == pytest.approx(0.123)
    from metaseg.utils.errors import CheckpointError
    with pytest.raises(CheckpointError, match="shape"):
        MetaSGD(tiny_net(), inner_lr=ALPHA, inner_steps=2, per_element=True).load_meta_state_dict(state)
    with pytest.raises(CheckpointError, match="no meta_state.step_sizes"):
        other.load_meta_state_dict({})
    with pytest.raises(CheckpointError, match="does not use them"):
        MAML(tiny_net(), inner_lr=ALPHA, inner_steps=2).load_meta_state_dict(state)


# -- MAML++ -------------------------------------------------------------------------------
def test_multi_step_weights_anneal_to_the_last_step():
    w1 = multi_step_weights(1, 3, 10)
    assert w1 == pytest.approx([1 / 3] * 3)
    w5 = multi_step_weights(5, 3, 10)
    assert sum(w5) == pytest.approx(1.0) and w5[0] < 1 / 3 < w5[-1]
    assert multi_step_weights(10, 3, 10)[0] >= 0.03 / 3 - 1e-12
    assert multi_step_weights(11, 3, 10) is None  # annealed: last step only
    assert multi_step_weights(1, 1, 10) is None


def test_multi_step_loss_matches_weighted_reference():
    model = tiny_net()
    support, query = task()
    learner = MAML(model, inner_lr=ALPHA, inner_steps=3, multi_step_loss=True, msl_anneal_steps=10)
    loss, got = grads_of(learner, support, query, step=4)
    w = multi_step_weights(4, 3, 10)
    params = leaves(model)
    traj = unroll(model, params, support, 3, lambda k, n: ALPHA, create_graph=True)
    ref_loss = sum(wk * loss_at(model, phi, query) for wk, phi in zip(w, traj))
    ref = dict(zip(params, torch.autograd.grad(ref_loss, list(params.values()))))
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    assert_close(got, ref)
    assert learner.last_stats["query_loss_after"] == pytest.approx(loss_at(model, traj[-1], query).item())


def test_derivative_order_annealing_switches_at_the_given_step():
    model = tiny_net()
    support, query = task()
    learner = MAML(model, inner_lr=ALPHA, inner_steps=2, first_order_until=5)
    _, early = grads_of(learner, support, query, step=5)
    _, late = grads_of(learner, support, query, step=6)
    params = leaves(model)
    phi = unroll(model, params, support, 2, lambda k, n: ALPHA, create_graph=True)[-1]
    second = dict(zip(params, torch.autograd.grad(loss_at(model, phi, query), list(params.values()))))
    phi_d = {n: p.detach().requires_grad_() for n, p in phi.items()}
    first = dict(zip(phi_d, torch.autograd.grad(loss_at(model, phi_d, query), list(phi_d.values()))))
    assert_close(early, first)
    assert_close(late, second)
    assert first_order_at(5, False, 5) and not first_order_at(6, False, 5) and first_order_at(99, True, 0)


def test_cosine_beta_schedule_is_set_on_the_optimizer():
    assert outer_lr_at(1, 0.01, "cosine", 100) == pytest.approx(0.01)
    assert outer_lr_at(51, 0.01, "cosine", 100) == pytest.approx(0.005)
    assert outer_lr_at(100, 0.01, "cosine", 100, 0.001) == pytest.approx(0.001, abs=1e-5)
    assert outer_lr_at(7, 0.01, "constant", 100) == 0.01
    model = tiny_net()
    learner = MAML(model, inner_lr=ALPHA, inner_steps=1,
                          outer=OuterSettings(lr=0.01, schedule="cosine", max_steps=100, meta_batch=1))
    opt = learner.make_optimizer()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stats = learner.meta_step(FixedTasks(T(*task())), opt, scaler, 51)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005) and stats["outer_lr"] == pytest.approx(0.005)


# -- the outer step: averaging, safety, clipping -----------------------------------------------
def test_meta_step_averages_task_meta_gradients():
    model = tiny_net()
    t1, t2 = T(*task(seed=1)), T(*task(seed=2))
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    refs = []
    for t in (t1, t2):
        ref_learner = MAML(copy.deepcopy(model), inner_lr=ALPHA, inner_steps=2)
        refs.append(grads_of(ref_learner, t.support, t.query)[1])
    learner = MAML(model, inner_lr=ALPHA, inner_steps=2, outer=OuterSettings(lr=0.5, meta_batch=2))
    opt = torch.optim.SGD(learner.parameters(), lr=0.5)
    stats = learner.meta_step(FixedTasks(t1, t2), opt, torch.amp.GradScaler("cpu", enabled=False), 1, log=True)
    for n, p in model.named_parameters():
        expected = theta[n] - 0.5 * (refs[0][n] + refs[1][n]) / 2
        assert torch.allclose(p.detach(), expected, rtol=1e-9, atol=1e-12), n
    assert stats["tasks_skipped"] == 0 and math.isfinite(stats["query_loss_before"])
    assert {"outer_loss", "query_loss_after", "support_loss_before", "grad_norm"} <= set(stats)


def test_non_finite_task_is_skipped_and_three_in_a_row_stop_the_run():
    model = tiny_net()
    good = T(*task(seed=1))
    (sx, sy), query = task(seed=2)
    bad = T((sx * float("nan"), sy), query)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, ref = grads_of(MAML(copy.deepcopy(model), inner_lr=ALPHA, inner_steps=1), good.support, good.query)
    learner = MAML(model, inner_lr=ALPHA, inner_steps=1, outer=OuterSettings(lr=0.1, meta_batch=2))
    opt = torch.optim.SGD(learner.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stats = learner.meta_step(FixedTasks(good, bad), opt, scaler, 1)
    assert stats["tasks_skipped"] == 1 and learner.guard.total == 1
    for n, p in model.named_parameters():  # the mean over the one usable task
        assert torch.isfinite(p).all() and torch.allclose(p.detach(), theta[n] - 0.1 * ref[n], atol=1e-12), n
    learner.meta_step(FixedTasks(bad, good), opt, scaler, 2)  # the good task resets the run of bad ones
    assert learner.guard.in_a_row == 0
    learner.meta_step(FixedTasks(bad, bad), opt, scaler, 3)
    with pytest.raises(DivergenceError, match=r"3 tasks in a row.*smaller meta.inner_lr \(now 0.3\)"):
        learner.meta_step(FixedTasks(bad, bad), opt, scaler, 4)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_clip_grad_bounds_the_outer_step():
    model = tiny_net()
    t = T(*task())
    theta = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    learner = MAML(model, inner_lr=ALPHA, inner_steps=1, outer=OuterSettings(lr=1.0, clip_grad=1e-3))
    opt = torch.optim.SGD(learner.parameters(), lr=1.0)
    stats = learner.meta_step(FixedTasks(t), opt, torch.amp.GradScaler("cpu", enabled=False), 1)
    moved = (torch.cat([p.detach().flatten() for p in model.parameters()]) - theta).norm().item()
    assert stats["grad_norm"] > 1e-2 and moved == pytest.approx(1e-3, rel=1e-4)


def test_unused_parameters_stay_put_in_second_order():
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_net()
            self.spare = nn.Conv2d(3, 3, 1).double()  # never called, like efficientnet-b0's cut stages

        def forward(self, x):
            return self.net(x)

    model = WithUnused()
    support, query = task()
    learner = MAML(model, inner_lr=ALPHA, inner_steps=2)
    learner.outer_loss(support, query).backward()
    assert model.spare.weight.grad is None and model.net[0].weight.grad is not None
    adapted = learner.adapt(*support)
    assert torch.equal(adapted.spare.weight, model.spare.weight)


# -- Reptile ------------------------------------------------------------------------------
def test_reptile_step_is_epsilon_times_mean_displacement():
    model = tiny_net()
    tasks = [T(*task(seed=s)) for s in (1, 2)]
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    phis = []
    for t in tasks:  # independent: plain torch SGD on a copy
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=ALPHA)
        for _ in range(3):
            opt.zero_grad()
            loss_fn(m(t.support[0]), t.support[1]).backward()
            opt.step()
        phis.append(dict(m.named_parameters()))
    eps = 0.4
    learner = Reptile(model, inner_lr=ALPHA, inner_steps=3, outer=OuterSettings(lr=eps, meta_batch=2))
    opt = learner.make_optimizer()
    assert isinstance(opt, torch.optim.SGD)
    stats = learner.meta_step(FixedTasks(*tasks), opt, torch.amp.GradScaler("cpu", enabled=False), 1, log=True)
    for n, p in model.named_parameters():
        expected = theta[n] + eps * ((phis[0][n] + phis[1][n]) / 2 - theta[n])
        assert torch.allclose(p.detach(), expected.detach(), rtol=1e-9, atol=1e-12), n
    assert {"query_loss_after", "support_loss_before", "outer_loss"} <= set(stats)


# -- MLDG ---------------------------------------------------------------------------------
@pytest.mark.parametrize("first_order", [False, True])
def test_mldg_matches_its_formula(first_order):
    model = tiny_net()
    d_i, _ = task(seed=1)
    _, d_j = task(seed=2)
    gamma = 0.7
    learner = MLDG(model, inner_lr=ALPHA, inner_steps=1, gamma=gamma, first_order=first_order)
    loss, got = grads_of(learner, d_i, d_j)
    params = leaves(model)
    l_i = loss_at(model, params, d_i)
    g_i = torch.autograd.grad(l_i, list(params.values()), create_graph=not first_order)
    prime = {n: params[n] - ALPHA * g for n, g in zip(params, g_i)}
    if first_order:  # grad L_i(theta) + gamma * grad L_j evaluated at theta'
        prime = {n: p.detach().requires_grad_() for n, p in prime.items()}
        dj = torch.autograd.grad(loss_at(model, prime, d_j), list(prime.values()))
        ref = {n: gi.detach() + gamma * gj for n, gi, gj in zip(params, g_i, dj)}
        ref_loss = l_i + gamma * loss_at(model, prime, d_j)
    else:
        ref_loss = l_i + gamma * loss_at(model, prime, d_j)
        ref = dict(zip(params, torch.autograd.grad(ref_loss, list(params.values()))))
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    assert_close(got, ref)


# -- ERM ----------------------------------------------------------------------------------
def test_erm_makes_k_plus_one_adam_updates_on_the_same_batches():
    model = tiny_net()
    tasks = [T(*task(seed=s)) for s in (1, 2)]
    ref = copy.deepcopy(model)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2)
    for batches in ([t.support for t in tasks],) * 2 + ([t.query for t in tasks],):
        opt_ref.zero_grad()
        for x, y in batches:
            (loss_fn(ref(x), y) / 2).backward()
        opt_ref.step()
    learner = ERM(model, inner_lr=ALPHA, inner_steps=2, outer=OuterSettings(lr=1e-2, meta_batch=2))
    stats = learner.meta_step(FixedTasks(*tasks), learner.make_optimizer(), torch.amp.GradScaler("cpu", enabled=False),
                              1, log=True)
    for (n, p), r in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(p, r, rtol=1e-9, atol=1e-12), n
    assert {"query_loss_before", "query_loss_after", "support_loss_before", "support_loss_after"} <= set(stats)


def test_every_algorithm_is_in_the_one_registry():
    assert set(ALGORITHMS) == {"maml", "fomaml", "anil", "metasgd", "reptile", "mldg", "erm", "imaml"}
    assert ALGORITHMS["maml"] is MAML
    for name, cls in ALGORITHMS.items():
        extra = {"inner_params": ["-1"]} if name == "anil" else {}  # ANIL's default names smp modules
        learner = ALGORITHMS[name](tiny_net(), inner_lr=ALPHA, inner_steps=1, **extra)
        assert isinstance(learner, MetaLearner) and type(learner) is cls and learner.name == name
        loss = learner.outer_loss(*task())
        loss.backward()
        assert torch.isfinite(loss) and learner.model[0].weight.grad is not None
    with pytest.raises(ConfigError, match="reptyle"):
        validate_meta(OmegaConf.structured(MetaConfig(algorithm="reptyle")))


def test_the_base_learner_adapts_but_is_no_algorithm():
    """MAML's variants are MAML; Reptile and ERM share only the base learner, which has no objective of its own."""
    assert all(issubclass(cls, MAML) for cls in (FOMAML, ANIL, MetaSGD, MLDG, IMAML))
    assert not issubclass(Reptile, MAML) and not issubclass(ERM, MAML) and issubclass(MAML, MetaLearner)
    assert Reptile(tiny_net(), inner_lr=ALPHA, inner_steps=1).first_order  # declared first order only
    base = MetaLearner(tiny_net(), inner_lr=ALPHA, inner_steps=1)
    support, query = task()
    assert torch.equal(base.adapt(*support)[0].weight,
                       MAML(tiny_net(), inner_lr=ALPHA, inner_steps=1).adapt(*support)[0].weight)
    with pytest.raises(NotImplementedError, match="no outer objective"):
        base.outer_loss(support, query)


def test_anil_reuses_frozen_encoder_outputs_without_changing_the_meta_gradient():
    from metaseg.config import ModelConfig
    from metaseg.models import build_model
    from metaseg.data.synthetic import synthetic_task
    torch.manual_seed(0)
    model = build_model(ModelConfig(extra={"encoder_depth": 3, "decoder_channels": [16, 8, 8]}), 4).double()
    support, query = [(x.double(), y) for x, y in synthetic_task(n=2)]
    calls = []
    model.encoder.conv1.register_forward_hook(lambda *a: calls.append(1))  # runs only when computed
    learner = ANIL(model, inner_lr=ALPHA, inner_steps=3, backend="func")  # higher reuses too (test_bench_scripts)
    assert model.encoder in learner.inner.frozen and model.decoder.blocks[0] in learner.inner.frozen
    _, reused = grads_of(learner, support, query)
    assert len(calls) == 2  # the support batch once for all three inner steps, the query once
    learner.inner.frozen = []  # recompute everything at every step
    calls.clear()
    _, plain = grads_of(learner, support, query)
    assert len(calls) == 4
    assert_close(reused, plain, rtol=1e-10, atol=1e-13)
    assert not any("forward" in vars(m) for m in model.modules())  # the memo is gone after the task


def test_maml_matches_higher_as_an_independent_implementation():
    """The inner loop against MAML written with higher's own innerloop_ctx and DifferentiableOptimizer."""
    higher = pytest.importorskip("higher")
    model = tiny_net()
    support, query = task()
    _, got = grads_of(MAML(model, inner_lr=ALPHA, inner_steps=2), support, query)
    ref_model = copy.deepcopy(model)
    with higher.innerloop_ctx(ref_model, torch.optim.SGD(ref_model.parameters(), lr=ALPHA),
                              copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(loss_fn(fmodel(support[0]), support[1]))
        loss_fn(fmodel(query[0]), query[1]).backward()
    assert_close(got, {n: p.grad for n, p in ref_model.named_parameters()})


def test_memo_keeps_the_latest_inputs_only():
    model = tiny_net()
    learner = ANIL(model, inner_lr=ALPHA, inner_steps=1, inner_params=["-1"], backend="func")
    assert model[0] in learner.inner.frozen
    xs = [torch.randn(2, 3, 4, 4, dtype=torch.float64) for _ in range(3)]
    with learner.inner.reusing():
        out = [model[0](xs[i]) for i in (0, 1, 0, 2, 0, 1)]
        xs[2].add_(1)  # an in-place change is a new input
        changed = model[0](xs[2])
    assert out[2] is out[0] and out[4] is out[0]  # hits
    assert out[5] is not out[1]  # evicted by x2: the cache keeps the two latest inputs
    assert changed is not out[3]
    assert model[0](xs[0]) is not out[0]  # outside the context nothing is reused
