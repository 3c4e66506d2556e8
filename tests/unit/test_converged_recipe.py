"""experiment=converged / converged_meta / converged_gpu: they compose and validate with every arm.
A toy-size run of each: tests/integration/test_converged_recipe.py."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from metaseg.engine.training.trainer import validate
from metaseg.utils.errors import ConfigError
from tests.helpers import ROOT, compose_cfg, load_script


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


@pytest.mark.parametrize("fold,tuned", [("retina_drive", ["retina_stare", "retina_chasedb1"]),
                                        ("polyp_kvasir_seg", None)])
def test_study_scratch_arm_is_evaluated_like_the_trained_arms(fold, tuned):
    """The study's scratch arm (metaseg-eval checkpoint=none) takes the erm recipe's evaluation block,
    then the fold's own keys: its adaptation is tuned on the same validation sets as the trained arms'."""
    study = load_script("study")
    args = SimpleNamespace(data_root="data", seed=0, set=[], threads=1, experiment="converged")
    cmd = study.command(fold, "scratch", Path("run"), args, study.eval_block("converged", []))
    assert cmd[1:4] == ["-m", "metaseg.eval", "checkpoint=none"]
    scratch = compose_cfg("eval", [o for o in cmd[3:] if not o.startswith("hydra.")])
    erm = study.command(fold, "erm", Path("run"), args, [])
    trained = compose_cfg("train", [o for o in erm[3:] if not o.startswith(("hydra.", "trainer."))])
    assert (list(scratch.eval.tune_datasets) if scratch.eval.tune_datasets else None) == tuned
    for key in ("tune_datasets", "shots", "curve_steps", "tune_lrs", "tune_steps", "mode", "episodes"):
        assert scratch.eval[key] == trained.eval[key], key
    assert scratch.model == trained.model and scratch.data.heldout == [fold]


def test_readme_study_table_is_the_recorded_results(tmp_path):
    """The README's study table is scripts/study.py's summary of docs/study_results.json, row for row."""
    study = load_script("study")
    shutil.copy(ROOT / "docs" / "study_results.json", tmp_path / "results.json")
    rows = study.summary_table(tmp_path, study.FOLDS, study.ARMS).strip().splitlines()
    readme = (ROOT / "README.md").read_text().split("<!-- study-table -->")[1].split("<!-- /study-table -->")[0]
    assert len(rows) > 4 and all(row in readme.splitlines() for row in rows)
