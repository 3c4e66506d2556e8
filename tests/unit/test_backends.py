"""The two inner-loop backends, higher (default) and torch.func, give the same numbers."""

import pytest
import torch

from metaseg.config import ModelConfig
from metaseg.meta import ALGORITHMS, MAML
from metaseg.meta.inner import HigherInnerLoop, InnerLoop
from metaseg.models import build_model
from metaseg.utils.errors import ConfigError
from tests.helpers import task, tiny_net


def test_default_backend_is_higher():
    learner = MAML(tiny_net(), inner_lr=0.1, inner_steps=1)
    assert isinstance(learner.inner, HigherInnerLoop)
    assert type(MAML(tiny_net(), inner_lr=0.1, inner_steps=1, backend="func").inner) is InnerLoop
    with pytest.raises(ConfigError, match="meta.backend='jax'"):
        MAML(tiny_net(), inner_lr=0.1, inner_steps=1, backend="jax")


@pytest.mark.parametrize("algorithm,extra", [("maml", {}), ("fomaml", {}), ("anil", {"inner_params": ["4", "6"]}),
                                             ("metasgd", {}), ("mldg", {}), ("reptile", {})])
def test_backends_agree_on_meta_gradient_and_adaptation(algorithm, extra):
    support, query = task()
    out = {}
    for backend in ("higher", "func"):
        model = tiny_net()
        learner = ALGORITHMS[algorithm](model, inner_lr=0.2, inner_steps=2, backend=backend, **extra)
        model.zero_grad(set_to_none=True)
        loss = learner.outer_loss(support, query)
        loss.backward()
        grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in learner.parameters()]
        adapted = learner.adapt(*support)
        out[backend] = (loss.detach(), grads, [p.detach() for p in adapted.parameters()])
    (lh, gh, ah), (lf, gf, af) = out["higher"], out["func"]
    assert torch.allclose(lh, lf, rtol=1e-12, atol=1e-12)
    for a, b in zip(gh + ah, gf + af):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_higher_backend_on_smp_unet_matches_func():
    support, query = task(n=2, size=32, dtype=torch.float32)
    grads = {}
    for backend in ("higher", "func"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(extra={"encoder_depth": 3, "decoder_channels": [16, 8, 8]}), 3)
        learner = MAML(model, inner_lr=0.05, inner_steps=2, backend=backend)
        learner.outer_loss(support, query).backward()
        grads[backend] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.allclose(grads["higher"], grads["func"], rtol=1e-4, atol=1e-6)


def test_higher_backend_keeps_user_buffers_out_of_tasks():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                              torch.nn.Conv2d(4, 3, 1)).double()  # running stats kept on purpose
    before = {k: v.clone() for k, v in net.state_dict().items()}
    learner = MAML(net, inner_lr=0.1, inner_steps=2)
    learner.outer_loss(*task()).backward()
    learner.adapt(*task()[0])
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
