"""MAML's meta-gradients against independent computations.

The reference is written from scratch with ``torch.func.functional_call`` and
``torch.autograd.grad(create_graph=True)``: no higher, no metaseg code. Finite
differences of the query loss through the unrolled inner loop check both on a tiny model in
float64.
"""

import pytest
import torch
from torch.func import functional_call

from metaseg.meta import MAML
from metaseg.config import ModelConfig
from metaseg.models import build_model
from tests.helpers import loss_fn, task, tiny_net


def reference_query_loss(model, params, support, query, lr, steps, create_graph=True):
    """Unrolled SGD with functional_call; returns the query loss at phi_K as a function of ``params``."""
    names = [n for n, _ in model.named_parameters()]
    fast = dict(zip(names, params))
    for _ in range(steps):
        loss = loss_fn(functional_call(model, fast, (support[0],)), support[1])
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=create_graph)
        fast = {n: p - lr * g for (n, p), g in zip(fast.items(), grads)}
    return loss_fn(functional_call(model, fast, (query[0],)), query[1]), fast


def meta_grad(learner, support, query):
    learner.model.zero_grad(set_to_none=True)
    loss = learner.outer_loss(support, query)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in learner.model.parameters()]


@pytest.mark.parametrize("steps", [1, 3])
def test_second_order_matches_functional_reference(steps):
    model = tiny_net()
    support, query = task()
    learner = MAML(model, inner_lr=0.3, inner_steps=steps)
    loss, grads = meta_grad(learner, support, query)

    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    ref_loss, _ = reference_query_loss(model, params, support, query, 0.3, steps)
    ref = torch.autograd.grad(ref_loss, params)
    assert torch.allclose(loss, ref_loss.detach(), atol=1e-12)
    for g, r in zip(grads, ref):
        assert torch.allclose(g, r, rtol=1e-7, atol=1e-10)
    # the second-order terms matter here: dropping them gives a different gradient
    _, fast = reference_query_loss(model, params, support, query, 0.3, steps, create_graph=False)
    fo = torch.autograd.grad(loss_fn(functional_call(model, fast, (query[0],)), query[1]), list(fast.values()))
    assert max((g - f).abs().max() for g, f in zip(grads, fo)) > 1e-4


def test_second_order_matches_finite_differences():
    model = tiny_net()
    support, query = task()
    learner = MAML(model, inner_lr=0.3, inner_steps=2)
    _, grads = meta_grad(learner, support, query)
    params = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(3)
    eps = 1e-6
    for _ in range(3):  # directional derivatives along random directions
        direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
        def f(sign):
            shifted = [(p + sign * eps * d).requires_grad_() for p, d in zip(params, direction)]
            return reference_query_loss(model, shifted, support, query, 0.3, 2, create_graph=False)[0].item()
        numeric = (f(+1) - f(-1)) / (2 * eps)
        analytic = sum((gr * d).sum() for gr, d in zip(grads, direction)).item()
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def test_first_order_is_query_gradient_at_adapted_weights():
    model = tiny_net()
    support, query = task()
    learner = MAML(model, inner_lr=0.3, inner_steps=3, first_order=True)
    loss, grads = meta_grad(learner, support, query)

    # independent: plain SGD on a copy, then the query gradient there
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    _, fast = reference_query_loss(model, params, support, query, 0.3, 3, create_graph=False)
    fast = {n: p.detach().requires_grad_() for n, p in fast.items()}
    q = loss_fn(functional_call(model, fast, (query[0],)), query[1])
    ref = torch.autograd.grad(q, list(fast.values()))
    assert loss.item() == pytest.approx(q.item(), rel=1e-12)
    for g, r in zip(grads, ref):
        assert torch.allclose(g, r, rtol=1e-7, atol=1e-10)


def test_smp_unet_meta_gradient_matches_reference():
    torch.manual_seed(0)
    cfg = ModelConfig(extra={"encoder_depth": 3, "decoder_channels": [16, 8, 8]})
    model = build_model(cfg, 3)
    support, query = task(n=2, size=32, dtype=torch.float32)
    learner = MAML(model, inner_lr=0.05, inner_steps=2)
    _, grads = meta_grad(learner, support, query)
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    ref_loss, _ = reference_query_loss(model, params, support, query, 0.05, 2)
    ref = torch.autograd.grad(ref_loss, params)
    num = sum(((g - r) ** 2).sum() for g, r in zip(grads, ref)).sqrt()
    den = sum((r**2).sum() for r in ref).sqrt()
    assert den > 0 and (num / den) < 1e-4


def test_adapt_equals_plain_sgd_and_leaves_model_untouched():
    model = tiny_net()
    support, _ = task()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learner = MAML(model, inner_lr=0.2, inner_steps=3)
    adapted = learner.adapt(*support)

    manual = tiny_net()
    manual.load_state_dict(before)
    opt = torch.optim.SGD(manual.parameters(), lr=0.2)
    for _ in range(3):
        opt.zero_grad()
        loss_fn(manual(support[0]), support[1]).backward()
        opt.step()
    for (n, a), m in zip(adapted.named_parameters(), manual.parameters()):
        assert torch.allclose(a, m, atol=1e-12), n
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    # adapt overrides: zero steps give theta back
    same = learner.adapt(*support, steps=0)
    assert all(torch.equal(a, b) for a, b in zip(same.parameters(), model.parameters()))


def test_custom_loss_is_used():
    model = tiny_net()
    support, query = task()
    calls = []
    def my_loss(logits, y):
        calls.append(logits.shape)
        return loss_fn(logits, y) * 2
    learner = MAML(model, inner_lr=0.1, inner_steps=2, loss=my_loss)
    out = learner.outer_loss(support, query)
    assert len(calls) == 3  # two inner steps, one query
    plain = MAML(tiny_net(), inner_lr=0.1, inner_steps=2, loss=lambda l, y: my_loss(l, y) / 2)
    ref = plain.outer_loss(support, query)
    assert out.item() != pytest.approx(ref.item())
