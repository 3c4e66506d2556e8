"""experiment=converged / converged_meta / converged_gpu: they compose and validate with every arm,
and a toy-size run of each trains, keeps held-out images out of the learning curve, and
evaluates with the adaptation curve."""

from __future__ import annotations

import json

import pytest

from metaseg.engine.training import trainer as trainer_module
from metaseg.engine.training.trainer import train, validate
from metaseg.utils.errors import ConfigError
from tests.conftest import compose_cfg
from tests.data_fixtures import folder_dataset
from tests.test_data_patches import NAMES, stripes

TOY = ["data.size=16", "data.train=[retina_drive,retina_stare]", "data.heldout=[retina_chasedb1]",
       "model.extra.decoder_channels=[8,8,8]", "model.extra.encoder_depth=3", "trainer.max_steps=2",
       "trainer.eval_every=1", "trainer.ckpt_every=1", "meta.shots=2", "meta.query=2", "meta.meta_batch=2",
       "eval.episodes=2", "eval.max_images=2", "eval.support_patches=2", "eval.tune_lrs=[0.1]",
       "eval.tune_steps=[1]", "eval.tune_episodes=1", "eval.pictures=0", "eval.shots=[2,1]",
       "eval.curve_steps=[0,1]", "eval.curve_shots=null", "eval.batch_size=8", "data.val_fraction=0.4", "trainer.device=cpu",
       "trainer.threads=1", "data.augment.zoom=[0.8,1.25]"]


@pytest.fixture()
def root(tmp_path):
    for key, (h, w) in {"a": (40, 48), "b": (36, 60), "c": (50, 50)}.items():
        folder_dataset(tmp_path / "data" / NAMES[key], n=8, h=h, w=w, masks=[stripes(h, w)] * 8)
    return tmp_path / "data"


@pytest.mark.parametrize("experiment", ["converged", "converged_meta", "converged_gpu"])
@pytest.mark.parametrize("meta", ["erm", "fomaml", "anil", "maml"])
def test_presets_compose_and_validate(experiment, meta):
    cfg = compose_cfg("train", [f"experiment={experiment}", f"meta={meta}", "data.heldout=[polyp_kvasir_seg]"])
    validate(cfg)
    assert cfg.model.smooth and cfg.model.norm == "group"  # one network for every arm, maml included
    assert cfg.trainer.eval_heldout == "final" and cfg.trainer.best_metric.startswith("val.")
    assert cfg.eval.curve_steps == [0, 1, 3, 10, 30, 100] and cfg.eval.shots[0] == 5
    if experiment == "converged_meta":  # every meta stage and its erm twin: the same tasks and images per step
        assert (cfg.meta.meta_batch, cfg.meta.shots, cfg.meta.query, cfg.meta.inner_steps) == (4, 4, 4, 3)
        assert cfg.trainer.best_metric == "val.mean.adapted_fg_dice"


@pytest.mark.parametrize("preset, extra", [("converged", []), ("converged_gpu", ["trainer.precision=bf16"])])
def test_toy_run_scores_held_out_only_at_the_end(root, tmp_path, monkeypatch, preset, extra):
    seen = []
    original = trainer_module.evaluate_heldout

    def spy(learner, datasets, *args, **kwargs):
        seen.append(sorted(datasets))
        return original(learner, datasets, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "evaluate_heldout", spy)
    cfg = compose_cfg("train", [f"experiment={preset}", "meta=erm", f"data.root={root}", *TOY, *extra])
    train(cfg, tmp_path / "run")
    assert seen == [[], ["retina_chasedb1"]]  # step 1: validation only; the final evaluation: held out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "zero_shot_fg_dice" in metrics["val"]["mean"]  # what best.pt and the learning curve read
    curve = metrics["datasets"]["retina_chasedb1"]["curve"]
    assert curve["metric"] == "fg_dice" and set(curve["shots"]) == {"2", "1"}
    assert (tmp_path / "run" / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_heldout_final_needs_a_validation_metric():
    cfg = compose_cfg("train", ["experiment=converged", "meta=erm", "trainer.best_metric=mean.zero_shot_miou"])
    with pytest.raises(ConfigError, match=r"trainer.eval_heldout=final .*\(val.mean.zero_shot_miou\)"):
        validate(cfg)
    bad = compose_cfg("train", ["trainer.eval_heldout=sometimes"])
    with pytest.raises(ConfigError, match="trainer.eval_heldout='sometimes' is not one of always, final"):
        validate(bad)


def test_gpu_meta_stage_is_the_gpu_network_with_the_meta_stage():
    """scripts/study.py --meta-experiment "[converged_gpu,meta_stage]": the meta stage on the GPU network."""
    cfg = compose_cfg("train", ["experiment=[converged_gpu,meta_stage]", "meta=maml"])
    validate(cfg)
    assert (cfg.model.encoder, cfg.data.size, cfg.trainer.precision) == ("resnet34", 128, "bf16")
    assert (cfg.trainer.max_steps, cfg.meta.inner_steps, cfg.meta.outer_lr) == (200, 3, 0.0002)
