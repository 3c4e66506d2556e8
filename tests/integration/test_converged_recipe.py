"""experiment=converged and converged_gpu at toy size: a run trains, keeps held-out images out of the
learning curve, and evaluates with the adaptation curve. That every preset composes and validates:
tests/unit/test_converged_recipe.py."""

from __future__ import annotations

import json

import pytest

from metaseg.engine.training import trainer as trainer_module
from metaseg.engine.training.trainer import train
from tests.helpers import compose_cfg

TOY = ["data.size=16", "data.train=[retina_drive,retina_stare]", "data.heldout=[retina_chasedb1]",
       "model.extra.decoder_channels=[8,8,8]", "model.extra.encoder_depth=3", "trainer.max_steps=2",
       "trainer.eval_every=1", "trainer.ckpt_every=1", "meta.shots=2", "meta.query=2", "meta.meta_batch=2",
       "eval.episodes=2", "eval.max_images=2", "eval.support_patches=2", "eval.tune_lrs=[0.1]",
       "eval.tune_steps=[1]", "eval.tune_episodes=1", "eval.pictures=0", "eval.shots=[2,1]",
       "eval.curve_steps=[0,1]", "eval.curve_shots=null", "eval.batch_size=8", "data.val_fraction=0.4", "trainer.device=cpu",
       "trainer.threads=1", "data.augment.zoom=[0.8,1.25]"]


@pytest.mark.parametrize("preset, extra", [
    ("converged", []),
    # slow: bf16 autocast on the CPU makes the same toy run about twice as long (~9 s on two idle cores)
    pytest.param("converged_gpu", ["trainer.precision=bf16"], marks=pytest.mark.slow),
])
def test_toy_run_scores_held_out_only_at_the_end(vessel_root, tmp_path, monkeypatch, preset, extra):
    seen = []
    original = trainer_module.evaluate_heldout

    def spy(learner, datasets, *args, **kwargs):
        seen.append(sorted(datasets))
        return original(learner, datasets, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "evaluate_heldout", spy)
    cfg = compose_cfg("train", [f"experiment={preset}", "meta=erm", f"data.root={vessel_root}", *TOY, *extra])
    train(cfg, tmp_path / "run")
    assert seen == [[], ["retina_chasedb1"]]  # step 1: validation only; the final evaluation: held out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "zero_shot_fg_dice" in metrics["val"]["mean"]  # what best.pt and the learning curve read
    curve = metrics["datasets"]["retina_chasedb1"]["curve"]
    assert curve["metric"] == "fg_dice" and set(curve["shots"]) == {"2", "1"}
    assert (tmp_path / "run" / "curve.png").read_bytes()[:4] == b"\x89PNG"
