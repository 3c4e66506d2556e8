"""BatchNorm: batch statistics inside tasks; nothing a task does reaches the stored model."""

import torch

from metaseg.meta import MAML
from metaseg.models.factory import build_model, set_norm
from metaseg.config import ModelConfig
from tests.helpers import task, tiny_net


def small_unet(norm="batch"):
    cfg = ModelConfig(extra={"encoder_depth": 3, "decoder_channels": [16, 8, 8]}, norm=norm)
    torch.manual_seed(0)
    return build_model(cfg, 3).double()


def test_no_running_stats_and_batch_statistics_in_eval_mode():
    model = small_unet()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.running_mean is None and not m.track_running_stats for m in bns)
    assert not any("running" in k or "num_batches" in k for k in model.state_dict())
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        train_out = model.train()(x)
        eval_out = model.eval()(x)
        alone = model(x[:1])
    assert torch.allclose(train_out, eval_out)  # batch statistics in both modes
    assert not torch.allclose(alone, eval_out[:1])  # ...of the batch the image is in


def test_tasks_do_not_leak_into_stored_model():
    model = small_unet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learner = MAML(model, inner_lr=0.5, inner_steps=2)
    (s_x, s_y), (q_x, q_y) = task(n=2, size=32)
    learner.outer_loss((s_x * 5 + 3, s_y), (q_x, q_y)).backward()  # a task with very different stats
    learner.adapt(s_x * 5 + 3, s_y)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_group_norm_option_replaces_batchnorm():
    model = small_unet("group")
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x)[:1], model(x[:1]))  # no batch dependence


def test_set_norm_keeps_tiny_net_trainable():
    net = set_norm(tiny_net(), "batch")
    learner = MAML(net, inner_lr=0.1, inner_steps=1)
    learner.outer_loss(*task()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
