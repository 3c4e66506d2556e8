"""What exact resume rests on: RNG capture/restore, isolation of evaluation, deterministic mode.

Whole runs (the same seed gives the same metrics.json, evaluation leaves the training's streams
alone): tests/integration/test_resume_determinism.py.
"""

import random

import numpy as np
import pytest
import torch

from metaseg.data.tasks import TaskSampler
from metaseg.engine.checkpoint import config_differences, load_checkpoint, save_checkpoint
from metaseg.engine.state import capture, deterministic_algorithms, restore, rng_isolated, rng_state, set_rng_state
from metaseg.utils.errors import ConfigError


def _draw():
    return (random.random(), random.getrandbits(64), float(np.random.rand()), float(np.random.randn()),
            torch.rand(3).tolist(), torch.randint(0, 10**6, (2,)).tolist())


def test_rng_state_survives_a_checkpoint_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's legacy state
    save_checkpoint(tmp_path / "c.pt", model={}, config={}, rng=rng_state())
    expected = _draw()
    _draw()
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])  # through torch.load(weights_only=True)
    assert _draw() == expected


def test_rng_isolated_leaves_every_stream_where_it_was():
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    before = rng_state()
    expected = _draw()
    set_rng_state(before)
    with rng_isolated():
        _draw(), _draw()
    assert _draw() == expected


def test_capture_and_restore_objects_including_the_task_sampler():
    ds = {"a": torch.utils.data.TensorDataset(torch.zeros(10, 1), torch.zeros(10))}
    sampler = TaskSampler(ds, [1.0], shots=2, query=2, seed=0)
    sampler.sample()
    model = torch.nn.Linear(2, 2)
    state = capture({"model": model, "sampler": sampler, "absent": None})
    assert set(state) == {"model", "sampler", "rng"}
    expected_draws, expected_rand = [sampler.rng.integers(1000) for _ in range(3)], torch.rand(2)
    with torch.no_grad():
        model.weight.add_(1)
    sampler.sample()
    restore(state, {"model": model, "sampler": sampler}, "mem")
    assert [sampler.rng.integers(1000) for _ in range(3)] == expected_draws
    assert torch.equal(torch.rand(2), expected_rand)
    assert torch.equal(model.weight, state["model"]["weight"])


def test_config_differences_ignore_what_may_change_on_resume():
    saved = {"meta": {"inner_lr": 0.1}, "trainer": {"max_steps": 10, "precision": "32"}, "eval": {"shots": 5},
             "data": {"datasets": {"a": {"root": "/x", "num_images": 3}}}}
    now = {"meta": {"inner_lr": 0.1}, "trainer": {"max_steps": 20, "precision": "bf16"}, "eval": {"shots": 1},
           "data": {"datasets": {"a": {"root": "/y", "num_images": 4}}}, "new": 1}
    assert config_differences(saved, now) == [("data.datasets.a.num_images", 3, 4), ("new", "<absent>", 1),
                                              ("trainer.precision", "32", "bf16")]


def test_an_op_without_a_deterministic_kernel_is_a_config_error():
    with pytest.raises(ConfigError, match=r"trainer.deterministic=true: put_ does not have a deterministic "
                                          r"implementation; set trainer.deterministic_warn_only=true"):
        with deterministic_algorithms(True):
            torch.zeros(3).put_(torch.tensor([0]), torch.tensor([1.0]))
    assert not torch.are_deterministic_algorithms_enabled()
    with pytest.warns(UserWarning, match="put_ does not have a deterministic implementation"):
        with deterministic_algorithms(True, warn_only=True):
            torch.zeros(3).put_(torch.tensor([0]), torch.tensor([1.0]))
    assert not torch.are_deterministic_algorithms_enabled()
