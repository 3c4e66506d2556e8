"""Whole runs: the same seed and config give the same numbers (metrics.json byte for byte, with and
without deterministic mode), another seed others; evaluation, monitoring and pictures never move
the training's random streams. What this rests on: tests/unit/test_resume_determinism.py."""

import torch

from metaseg.engine.checkpoint import load_checkpoint
from metaseg.engine.training.trainer import train


def test_same_seed_gives_identical_metrics_json_with_and_without_deterministic_mode(tiny_cfg, tmp_path):
    common = ("trainer.max_steps=2", "trainer.eval_every=1", "eval.episodes=1", "eval.pictures=1", "eval.max_images=2")
    m1 = train(tiny_cfg(*common), tmp_path / "a")
    assert not torch.are_deterministic_algorithms_enabled()
    m2 = train(tiny_cfg(*common, "trainer.deterministic=true"), tmp_path / "b")
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run
    # the same seed and config (deterministic kernels change nothing on the CPU): the same numbers
    drop = lambda m: {k: v for k, v in m.items() if k != "seconds"}  # noqa: E731
    assert drop(m1) == drop(m2)
    assert (tmp_path / "a" / "metrics.json").read_bytes() == (tmp_path / "b" / "metrics.json").read_bytes()
    # evaluation, monitoring and pictures never move the training's random streams
    quiet = ("trainer.max_steps=2", "trainer.eval_every=0", "eval.episodes=1", "eval.pictures=0", "eval.max_images=2",
             "trainer.monitor_tasks=0")
    m_c = train(tiny_cfg(*quiet), tmp_path / "c")
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    c = load_checkpoint(tmp_path / "c" / "checkpoints" / "last.pt")
    assert all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"])
    assert torch.equal(a["rng"]["torch"], c["rng"]["torch"]) and a["sampler"] == c["sampler"]
    # another seed, other numbers
    m_d = train(tiny_cfg(*quiet, "seed=1"), tmp_path / "d")
    assert m_d["datasets"] != m_c["datasets"]
