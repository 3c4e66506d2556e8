"""meta.init_from a trained checkpoint, wired into training; the two-stage recipe (pretrain stage, then
meta-training). Its other sources (another label space, an encoder file): tests/unit/test_fair_init.py."""

import torch

from metaseg.engine.checkpoint import load_checkpoint
from metaseg.engine.training.init_from import initialise
from metaseg.engine.training.trainer import train
from metaseg.models.factory import build_model
from tests.helpers import SESSION_STEPS, TINY, compose_cfg

QUICK = [*TINY, "trainer.device=cpu", "eval.episodes=1", "eval.pictures=0", "trainer.monitor_tasks=0",
         "trainer.eval_every=0"]


def test_init_from_a_trained_checkpoint_loads_its_weights(trained, tmp_path):
    """The shared trained run's checkpoint; an erm run's feeding MAML is the two-stage recipe (below)."""
    ckpt = load_checkpoint(trained.last)
    cfg = compose_cfg("train", QUICK)
    model = build_model(cfg.model, 4)
    assert not all(torch.equal(v, ckpt["model"][k]) for k, v in model.state_dict().items())
    record = initialise(model, str(trained.last), ckpt["classes"])
    assert record["kind"] == "checkpoint" and record["algorithm"] == "maml" and record["step"] == SESSION_STEPS
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in model.state_dict().items())
    # wired into training: MAML from it with a vanishing beta ends (numerically) where the checkpoint left off
    run = train(compose_cfg("train", [*QUICK, f"meta.init_from={trained.last}", "trainer.max_steps=1",
                                      "meta.outer_lr=1e-12"]), tmp_path / "maml")
    after = load_checkpoint(tmp_path / "maml" / "checkpoints" / "last.pt")
    assert after["config"]["meta"]["init_from"] == str(trained.last) and run["step"] == 1
    assert all(torch.allclose(v, ckpt["model"][k], atol=1e-8) for k, v in after["model"].items())


def test_two_stage_recipe_runs_from_one_config(tmp_path):
    cfg = compose_cfg("train", ["experiment=two_stage", *QUICK, "pretrain.steps=2", "trainer.max_steps=1",
                                "trainer.eval_every=1"])
    assert cfg.pretrain.algorithm == "erm" and cfg.meta.algorithm == "maml"
    run = train(cfg, tmp_path)
    first = load_checkpoint(tmp_path / "pretrain" / "checkpoints" / "last.pt")
    assert first["step"] == 2 and first["config"]["meta"]["algorithm"] == "erm"
    assert first["config"]["pretrain"]["steps"] == 0
    second = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert second["config"]["meta"]["algorithm"] == "maml" and run["step"] == 1
    assert second["config"]["meta"]["init_from"].endswith("pretrain/checkpoints/best.pt")
    # the shipped experiment splits a single-stage arm's 200 outer steps
    full = compose_cfg("train", ["experiment=two_stage"])
    assert full.pretrain.steps + full.trainer.max_steps == compose_cfg("train", []).trainer.max_steps == 200
