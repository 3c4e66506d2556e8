"""Every algorithm through the real training and evaluation path, at smoke sizes; and its guards.

``metaseg-train meta=NAME`` for every YAML of ``conf/meta/``, in process (``train`` on a
composed config); Meta-SGD's step sizes in the checkpoint and in ``metaseg-eval``; the
second-order capability check; inner-loop safety; option validation; cross-dataset tasks.
"""

import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from metaseg.data.tasks import TaskSampler
from metaseg.engine.checkpoint import save_checkpoint
from metaseg.engine.evaluation.checkpoint_eval import evaluate_checkpoint
from metaseg.engine.training.trainer import train
from metaseg.meta import MAML, DivergenceError, SecondOrderError, second_order_problem
from metaseg.utils.errors import ConfigError
from tests.conftest import ROOT, compose_cfg
from tests.test_meta_gradient import loss_fn

NAMES = sorted(p.stem for p in (ROOT / "conf" / "meta").glob("*.yaml"))
SHORT = ["trainer.max_steps=2", "trainer.eval_every=0", "trainer.ckpt_every=2", "eval.episodes=1"]


def test_every_algorithm_has_a_config():
    assert set(NAMES) >= {"maml", "fomaml", "anil", "metasgd", "reptile", "mldg", "erm", "mamlpp"}


@pytest.mark.parametrize("name", NAMES)
def test_metaseg_train_meta_name_runs_and_checkpoints(tiny_cfg, tmp_path, name):
    cfg = tiny_cfg(f"meta={name}", *SHORT)
    metrics = train(cfg, tmp_path)
    assert metrics["step"] == 2 and 0 <= metrics["objective"] <= 1
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["config"]["meta"]["algorithm"] == cfg.meta.algorithm
    learned = cfg.meta.learn_inner_lr or cfg.meta.algorithm == "metasgd"
    assert bool(ckpt["meta_state"]) == learned
    if learned:  # meta-learned: moved away from alpha after two outer steps
        sizes = ckpt["meta_state"]["step_sizes"]
        assert sizes and all(isinstance(v, torch.Tensor) for v in sizes.values())
        assert any(not torch.allclose(v, torch.full_like(v, cfg.meta.inner_lr)) for v in sizes.values())


def test_metasgd_step_sizes_are_restored_by_metaseg_eval(tiny_cfg, tmp_path):
    train(tiny_cfg("meta=metasgd", *SHORT), tmp_path / "run")
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    ecfg = lambda p: compose_cfg("eval", [f"checkpoint={p}", "device=cpu", "eval.shots=2", "eval.episodes=2"])  # noqa: E731
    first = evaluate_checkpoint(ecfg(path), tmp_path / "e1")
    again = evaluate_checkpoint(ecfg(path), tmp_path / "e2")
    assert first["datasets"] == again["datasets"]
    ckpt = torch.load(path, weights_only=True)
    ckpt["meta_state"]["step_sizes"] = {k: v * 3 for k, v in ckpt["meta_state"]["step_sizes"].items()}
    save_checkpoint(tmp_path / "tampered.pt", **ckpt)  # a new digest: torch.save would keep the old one
    other = evaluate_checkpoint(ecfg(tmp_path / "tampered.pt"), tmp_path / "e3")
    zero = lambda r: {n: d["zero_shot"] for n, d in r["datasets"].items()}  # noqa: E731
    assert zero(other) == zero(first)  # same theta...
    assert other["mean"]["adapted_miou"] != first["mean"]["adapted_miou"]  # ...adapted with the saved rates
    del ckpt["meta_state"]
    save_checkpoint(tmp_path / "stripped.pt", **ckpt)
    from metaseg.utils.errors import CheckpointError
    with pytest.raises(CheckpointError, match="no meta_state.step_sizes"):
        evaluate_checkpoint(ecfg(tmp_path / "stripped.pt"), tmp_path / "e4")


MOBILENET = ["model.encoder=tu-mobilenetv3_small_050", "trainer.max_steps=1", "trainer.eval_every=0",
             "eval.episodes=1"]


def test_encoder_without_second_derivative_is_named_before_training(tiny_cfg, tmp_path):
    with pytest.raises(SecondOrderError) as exc:
        train(tiny_cfg(*MOBILENET), tmp_path)
    msg = str(exc.value)
    assert "model.encoder='tu-mobilenetv3_small_050'" in msg and "hardsigmoid" in msg
    assert "meta.first_order=true" in msg and "meta.second_order_fallback=true" in msg
    assert "\n" not in msg and not (tmp_path / "checkpoints").exists()


def test_second_order_fallback_trains_first_order_with_a_warning(tiny_cfg, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="metaseg"):
        metrics = train(tiny_cfg(*MOBILENET, "meta.second_order_fallback=true"), tmp_path)
    assert any("training first order instead" in r.getMessage() for r in caplog.records)
    assert math.isfinite(metrics["objective"])


def test_anil_stays_second_order_on_such_an_encoder_when_its_layers_are_not_adapted(tiny_cfg, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="metaseg"):
        metrics = train(tiny_cfg(*MOBILENET, "meta=anil"), tmp_path)
    assert math.isfinite(metrics["objective"]) and not any("first order" in r.getMessage() for r in caplog.records)


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


def test_diverging_inner_loop_stops_the_run_with_advice(tiny_cfg, tmp_path):
    with pytest.raises(DivergenceError, match=r"smaller meta.inner_lr \(now 1e\+30\)"):
        train(tiny_cfg("meta.inner_lr=1e30", "trainer.max_steps=4", "trainer.eval_every=0"), tmp_path)
    assert not (tmp_path / "metrics.json").exists()


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
