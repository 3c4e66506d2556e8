"""Every algorithm's guards: a config for each, an encoder without a second derivative named before
training (the probe, and the outer step's translated autograd error), incompatible options naming
the key, cross-dataset tasks (meta.query_from). Each algorithm through a training run:
tests/integration/test_algorithms_train.py.
"""

import numpy as np
import pytest
import torch
from torch import nn

from metaseg.data.tasks import TaskSampler
from metaseg.engine.training.trainer import train
from metaseg.meta import MAML, SecondOrderError, second_order_problem
from metaseg.utils.errors import ConfigError
from tests.helpers import ROOT, loss_fn

NAMES = sorted(p.stem for p in (ROOT / "conf" / "meta").glob("*.yaml"))
MOBILENET = ["model.encoder=tu-mobilenetv3_small_050", "trainer.max_steps=1", "trainer.eval_every=0",
             "eval.episodes=1"]


def test_every_algorithm_has_a_config():
    assert set(NAMES) >= {"maml", "fomaml", "anil", "metasgd", "reptile", "mldg", "erm", "mamlpp"}


def test_encoder_without_second_derivative_is_named_before_training(tiny_cfg, tmp_path):
    with pytest.raises(SecondOrderError) as exc:
        train(tiny_cfg(*MOBILENET), tmp_path)
    msg = str(exc.value)
    assert "model.encoder='tu-mobilenetv3_small_050'" in msg and "hardsigmoid" in msg
    assert "meta.first_order=true" in msg and "meta.second_order_fallback=true" in msg
    assert "\n" not in msg and not (tmp_path / "checkpoints").exists()


class Wrapped(nn.Module):
    """conv -> act -> conv: the first conv's bias gradient passes only through ``act``'s backward."""

    def __init__(self, act):
        super().__init__()
        self.first, self.act, self.head = nn.Conv2d(3, 6, 3, padding=1), act, nn.Conv2d(6, 3, 1)
        self.double()

    def forward(self, x):
        return self.head(self.act(self.first(x)))


def test_probe_reports_missing_double_backward_and_passes_smooth_layers():
    probe = second_order_problem(Wrapped(nn.Hardsigmoid()), loss_fn, ["first.weight", "first.bias", "head.weight",
                                                                      "head.bias"], size=8)
    assert probe.problem and "hardsigmoid" in probe.problem
    fine = Wrapped(nn.SiLU())
    assert second_order_problem(fine, loss_fn, [n for n, _ in fine.named_parameters()], size=8).problem is None
    partial = second_order_problem(fine, loss_fn, ["head.weight", "head.bias"], size=8)  # ANIL-style subset
    assert partial.problem is None and partial.unused == []


def test_missing_double_backward_at_the_outer_step_is_a_user_error():
    """Without the build-time probe (Python API), the outer backward's autograd error is translated."""
    model = Wrapped(nn.Hardsigmoid())
    x, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (2, 8, 8))
    task = type("T", (), {"support": (x, y), "query": (x, y)})()
    learner = MAML(model, inner_lr=0.1, inner_steps=1)
    opt = learner.make_optimizer()
    sampler = type("S", (), {"sample": lambda self: task})()
    with pytest.raises(SecondOrderError, match="hardsigmoid.*meta.first_order=true"):
        learner.meta_step(sampler, opt, torch.amp.GradScaler("cpu", enabled=False), 1)


@pytest.mark.parametrize("overrides,message", [
    (["meta=reptile", "meta.multi_step_loss=true"], "meta.multi_step_loss needs a meta-gradient"),
    (["meta=erm", "meta.learn_inner_lr=true"], "meta.learn_inner_lr needs a meta-gradient"),
    (["meta=fomaml", "meta.first_order_until=5"], "meta.first_order_until=5"),
    (["meta.inner_lr_per_step=true"], "meta.inner_lr_per_step=true needs learned step sizes"),
    (["meta.inner_lr_granularity=row"], "meta.inner_lr_granularity='row'"),
    (["meta.outer_lr_schedule=linear"], "meta.outer_lr_schedule='linear'"),
    (["meta.query_from=elsewhere"], "meta.query_from='elsewhere'"),
    (["meta.clip_grad=0"], "meta.clip_grad=0"),
    (["meta=mldg", "meta.inner_steps=0"], "meta.algorithm=mldg needs at least 1 inner step"),
    (["meta=anil", "meta.inner_params=[decoder.head]"], "meta.inner_params: 'decoder.head' matches no module"),
    (["meta.query_from=other", "data.train=[synth_0]"], "meta.query_from=other needs at least two"),
])
def test_incompatible_options_fail_naming_the_key(tiny_cfg, tmp_path, overrides, message):
    with pytest.raises(ConfigError) as exc:
        train(tiny_cfg(*overrides, "trainer.max_steps=1"), tmp_path)
    assert message in str(exc.value)
    assert not (tmp_path / "checkpoints").exists()


# -- cross-dataset tasks (meta.query_from) ---------------------------------------------------
class Tagged(torch.utils.data.Dataset):
    """Images whose every pixel holds (dataset id, index), so a batch says where it came from."""

    def __init__(self, tag, n=6):
        self.tag, self.n = tag, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        image = torch.tensor([self.tag, i, 0.0]).view(3, 1, 1).expand(3, 2, 2).clone()
        return image, torch.zeros(2, 2, dtype=torch.long)


def sources(batch):
    return {(int(img[0, 0, 0]), int(img[1, 0, 0])) for img in batch[0]}


def test_query_from_other_draws_the_query_from_another_dataset():
    data = {"a": Tagged(0), "b": Tagged(1), "c": Tagged(2)}
    sampler = TaskSampler(data, [1, 1, 2], shots=3, query=2, seed=0, query_from="other")
    pairs = []
    for _ in range(200):
        t = sampler.sample()
        s, q = sources(t.support), sources(t.query)
        assert len(s) == 3 and len(q) == 2 and not s & q
        assert {d for d, _ in s} == {"abc".index(t.dataset)} and {d for d, _ in q} == {"abc".index(t.query_dataset)}
        assert t.query_dataset != t.dataset
        pairs.append((t.dataset, t.query_dataset))
    # query datasets follow the weights renormalised without the support's: from a, c is twice as likely as b
    from_a = [q for d, q in pairs if d == "a"]
    assert from_a.count("c") > from_a.count("b")
    again = TaskSampler(data, [1, 1, 2], shots=3, query=2, seed=0, query_from="other")
    assert [(again.sample().query_dataset) for _ in range(20)] == [q for _, q in pairs[:20]]
    moved = TaskSampler(data, [1, 1, 2], shots=3, query=2, seed=0, query_from="other").sample().to("cpu")
    assert moved.query_dataset is not None


def test_query_from_same_keeps_the_task_stream_and_needs_two_datasets_for_other():
    data = {"a": Tagged(0), "b": Tagged(1)}
    s1 = TaskSampler(data, [1, 1], shots=2, query=2, seed=3)
    rng = np.random.default_rng(3)  # the stream the sampler always drew: dataset, then shots + query images
    for _ in range(5):
        t = s1.sample()
        name = ["a", "b"][rng.choice(2, p=[0.5, 0.5])]
        idx = rng.choice(6, 4, replace=False)
        assert t.dataset == name and t.query_dataset is None
        assert [int(i) for i in t.support[0][:, 1, 0, 0]] == list(idx[:2])
        assert [int(i) for i in t.query[0][:, 1, 0, 0]] == list(idx[2:])
    with pytest.raises(ConfigError, match="meta.query_from=other needs at least two"):
        TaskSampler({"a": Tagged(0)}, [1], shots=2, query=2, seed=0, query_from="other")
    # other: each dataset needs only max(shots, query) images
    TaskSampler({"a": Tagged(0, 3), "b": Tagged(1, 3)}, [1, 1], shots=3, query=3, seed=0, query_from="other")
