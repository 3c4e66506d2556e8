"""What the performance tools measure, in-process: meta.checkpoint_inner gives identical
meta-gradients (and is refused where it would do nothing), ANIL reuses frozen outputs on the higher
backend too. The scripts as run: tests/integration/test_bench_scripts.py."""

import pytest
import torch

from metaseg.config import ModelConfig
from metaseg.data.synthetic import synthetic_task
from metaseg.meta import ALGORITHMS, ANIL, MAML, Precision
from metaseg.meta.from_config import make_learner, validate_meta
from metaseg.models import build_model
from metaseg.utils.errors import ConfigError
from tests.helpers import task, tiny_net


@pytest.mark.parametrize("backend", ["higher", "func"])
@pytest.mark.parametrize("algorithm,extra", [("maml", {}), ("anil", {"inner_params": ["3", "6"]}),
                                             ("metasgd", {}), ("maml", {"multi_step_loss": True})])
def test_checkpoint_inner_gives_identical_meta_gradients(backend, algorithm, extra):
    support, query = task()
    out = {}
    for ckpt in (False, True):
        model = tiny_net()
        learner = ALGORITHMS[algorithm](model, inner_lr=0.2, inner_steps=3, backend=backend,
                                       checkpoint_inner=ckpt, **extra)
        loss = learner.outer_loss(support, query)
        loss.backward()
        out[ckpt] = (loss.detach(), [p.grad.clone() for p in learner.parameters()], dict(learner.last_stats))
    (l0, g0, s0), (l1, g1, s1) = out[False], out[True]
    assert torch.equal(l0, l1) and s0 == s1
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-15) for a, b in zip(g0, g1))
    assert any(float(g.abs().max()) > 1e-6 for g in g0)  # there is a gradient to compare


def test_checkpoint_inner_on_smp_unet_matches_without():
    support, query = [(x.double(), y) for x, y in synthetic_task(n=2)]
    grads = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_model(ModelConfig(extra={"encoder_depth": 3, "decoder_channels": [16, 8, 8]}), 4).double()
        MAML(model, inner_lr=0.05, inner_steps=2, checkpoint_inner=ckpt).outer_loss(support, query).backward()
        grads[ckpt] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert torch.allclose(grads[False], grads[True], rtol=1e-10, atol=1e-14)


def test_checkpoint_inner_is_refused_where_it_would_do_nothing(tiny_cfg):
    for overrides in (["meta=fomaml"], ["meta.first_order=true"], ["meta=reptile"], ["meta=mldg"]):
        cfg = tiny_cfg(*overrides, "meta.checkpoint_inner=true")
        with pytest.raises(ConfigError, match="meta.checkpoint_inner=true"):
            validate_meta(cfg.meta)
    cfg = tiny_cfg("meta=maml", "meta.checkpoint_inner=true")  # second order: allowed, and reaches the learner
    learner = make_learner(tiny_net(), cfg.meta, Precision())
    assert learner.checkpoint_inner and not make_learner(tiny_net(), tiny_cfg().meta, Precision()).checkpoint_inner
    validate_meta(tiny_cfg("meta=mamlpp", "meta.checkpoint_inner=true").meta)  # first order, then second


def test_anil_reuses_frozen_outputs_on_the_higher_backend_too():
    support, query = [(x.double(), y) for x, y in synthetic_task(n=2)]
    grads, calls = {}, []
    for backend, reuse in (("higher", True), ("higher", False), ("func", True)):
        torch.manual_seed(0)
        model = build_model(ModelConfig(extra={"encoder_depth": 3, "decoder_channels": [16, 8, 8]}), 4).double()
        learner = ANIL(model, inner_lr=0.1, inner_steps=3, backend=backend)
        if backend == "higher":
            fmodel = learner.inner.fmodel
            assert fmodel.encoder in learner.inner.frozen and fmodel.decoder.blocks[0] in learner.inner.frozen
            fmodel.encoder.conv1.register_forward_hook(lambda *a: calls.append(1))  # runs only when computed
            if not reuse:
                learner.inner.frozen = []
        calls.clear()
        learner.outer_loss(support, query).backward()
        if backend == "higher":
            # reused: the support batch once for all three inner steps, the query once; else 3 + 1
            assert len(calls) == (2 if reuse else 4)
            assert not any("forward" in vars(m) for m in fmodel.modules())  # the memo is gone after the task
        grads[backend, reuse] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert torch.allclose(grads["higher", True], grads["higher", False], rtol=1e-10, atol=1e-13)
    assert torch.allclose(grads["higher", True], grads["func", True], rtol=1e-10, atol=1e-13)
