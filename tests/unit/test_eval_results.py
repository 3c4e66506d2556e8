"""Typed results (eval.json read and written in one place), the one table writer, the eval block checked once."""

import dataclasses
import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from metaseg.config import EvalConfig
from metaseg.data.mix import build_mix
from metaseg.engine.evaluation.protocol import PATCH_MODE_FIX, evaluate_dataset, evaluate_heldout
from metaseg.engine.evaluation.results import DatasetResult, Estimate, Results, dataset_means
from metaseg.engine.evaluation.settings import EvalSettings, validate_eval
from metaseg.engine.evaluation.summary import paired_difference
from metaseg.meta.maml import MetaLearner
from metaseg.metrics import mean_ci95
from metaseg.utils.errors import ConfigError
from metaseg.utils.tables import csv_text, markdown_table
from tests.helpers import VESSELS, TinyNet, as_json, eval_cfg, make_learner, patch_cfg

CPU = torch.device("cpu")


# -- typed results --------------------------------------------------------------------------------
def test_a_dataset_result_writes_exactly_what_it_reads(heldout):
    res = evaluate_dataset(make_learner(), "synth_4", heldout, 4, eval_cfg(shots=[2, 1], episodes=3,
                                                                           curve_steps=[0, 2], mode="slide"), CPU, 0)
    typed = DatasetResult.from_dict(res)
    again = typed.to_dict()
    assert again == res and json.dumps(again) == json.dumps(res)  # the same keys, in the same order
    assert list(typed.adapted) == [2, 1] and typed.first.shots == 2  # the first k is the top level
    two = typed.adapted[2]
    assert two.get("miou").mean == res["adapted"]["2"]["miou"]["mean"]
    assert two.get("mf1", "image").ci95 == res["adapted"]["2"]["image"]["mf1"]["ci95"]
    assert two.values("miou", "image") == [ep["image_miou"] for ep in res["adapted"]["2"]["per_episode"]]
    assert two.supports == [ep["support"] for ep in res["adapted"]["2"]["per_episode"]]
    assert typed.zero_shot.get("iou") == res["zero_shot"]["iou"] and typed.window == [32, 32]
    assert typed.curve.points[1][2].per_episode == res["curve"]["shots"]["1"]["2"]["per_episode"]
    with pytest.raises(ValueError, match="reduction"):
        two.get("miou", "pixel")


def test_partial_results_read_as_far_as_they_go():
    """What a hand-made result (the summary's tests) or an old single-k eval.json holds."""
    d = DatasetResult.from_dict({"zero_shot": {"miou": 0.1}, "adapted": {"5": {"shots": 5, "miou": {"mean": 0.3,
                                                                                                     "ci95": 0.02}}}})
    assert d.zero_shot.get("miou") == 0.1 and d.zero_shot.get("miou", "image") is None
    assert d.first.get("miou") == Estimate(0.3, 0.02) and d.first.per_episode == [] and d.first.episodes is None
    old = DatasetResult.from_dict({"zero_shot": {}, "adapted": {"shots": 3, "miou": {"mean": 0.2, "ci95": 0.0}}})
    assert list(old.adapted) == [3]
    assert Results.from_dict(None).shots == [] and Results.from_dict({"datasets": {"x": {"zero_shot": {}}}}).shots == []


def test_dataset_means_are_the_stored_means(heldout):
    result = evaluate_heldout(make_learner(), {"a": heldout, "b": heldout}, 4, eval_cfg(shots=[1, 2], episodes=2),
                              CPU, 0)
    results = Results.from_dict(result)
    assert results.mean == result["mean"] == dataset_means(results.datasets)
    assert results.shots == [1, 2] and set(result["mean"]["adapted"]) == {"1", "2"}


def test_paired_difference_is_the_interval_of_the_differences():
    x, y = [0.5, 0.6, 0.7], [0.4, 0.6, 0.5]
    want = mean_ci95([0.1, 0.0, 0.2])
    d = paired_difference(x, y)
    assert d.mean == pytest.approx(want["mean"]) and d.ci95 == pytest.approx(want["ci95"])
    assert paired_difference(x, y[:2]) is None and paired_difference([], []) is None
    assert paired_difference(None, y) is None


# -- the table writer -----------------------------------------------------------------------------
def test_markdown_tables_to_paste_and_padded():
    assert markdown_table(["dataset", "zero-shot", "1-shot"], [["a", "1.0", "2.0 ± 0.1"]], align="lr") == [
        "| dataset | zero-shot | 1-shot |", "|---|---:|---:|", "| a | 1.0 | 2.0 ± 0.1 |"]
    assert markdown_table(["arm", "x"], [["erm", 3]]) == ["| arm | x |", "|---|---|", "| erm | 3 |"]
    padded = markdown_table(["dataset", "score"], [["synth_4", "9.9"], ["b", "10.25"]], align="lr", pad=True)
    assert padded == ["| dataset | score |", "|---------|------:|", "| synth_4 |   9.9 |", "| b       | 10.25 |"]
    with pytest.raises(ValueError, match="align"):
        markdown_table(["a"], [], align="c")


def test_csv_writes_missing_values_empty_and_floats_in_full():
    text = csv_text(["run", "value", "note"], [["0", 0.1 + 0.2, None], ["1", math.nan, "a,b"]])
    assert text == 'run,value,note\n0,0.30000000000000004,\n1,,"a,b"\n'


# -- the eval block, checked once -----------------------------------------------------------------
def test_settings_are_checked_once_and_derived_without_a_config():
    settings = validate_eval(eval_cfg(shots=[5, 1], episodes=4, curve_steps=[10, 0, 1], curve_shots=[5],
                                      val_episodes=2, pictures=3, tune_metric="fg_dice"))
    assert settings.shots == (5, 1) and settings.curve_steps == (0, 1, 10) and settings.curve_shots == (5,)
    assert validate_eval(settings) is settings  # settings pass through unchanged, unchecked again
    val = settings.for_validation()
    assert (val.shots, val.episodes, val.pictures, val.mode, val.curve_steps) == ((5,), 2, 0, "resize", ())
    assert settings.for_validation(shots=1, episodes=7, adapt_lr=0.3).shots == (1,)
    tuned = settings.with_adaptation(None, 3)
    assert (tuned.adapt_lr, tuned.adapt_steps) == (None, 3) and settings.adapt_steps is None  # frozen: a new value
    assert settings.without_figures() == dataclasses.replace(settings, pictures=0, curve_steps=(), curve_shots=())
    assert validate_eval(eval_cfg(shots=2, episodes=0)).episode_shots == ()
    assert validate_eval(OmegaConf.create({"shots": 3})).episodes == EvalConfig().episodes  # a hand-made config


@pytest.mark.parametrize("override,message", [
    ({"tune_metric": "dice"}, "eval.tune_metric='dice' is not one of miou, mf1, fg_dice, fg_iou"),
    ({"val_episodes": -1}, "eval.val_episodes=-1 must be >= 0 (or null)"),
    ({"tune": True, "tune_lrs": []}, "eval.tune needs eval.tune_lrs and eval.tune_steps to list values"),
])
def test_settings_name_the_key(override, message):
    with pytest.raises(ConfigError) as exc:
        validate_eval(eval_cfg(**override))
    assert message in str(exc.value)


def test_validation_tasks_are_an_argument_not_a_config_flag(vessel_root):
    """A patch dataset is refused in resize mode as held-out data, scored by sliding window as validation tasks."""
    cfg = patch_cfg(vessel_root, "data.val_fraction=0.34")
    mix = build_mix(cfg.data, validation=True)
    val = {VESSELS["a"]: mix.val[VESSELS["a"]]}
    torch.manual_seed(0)
    learner = MetaLearner(TinyNet(classes=2), inner_lr=0.1, inner_steps=1)
    settings = EvalSettings(shots=(1,), episodes=1, batch_size=8, pictures=0, max_images=2)
    with pytest.raises(ConfigError, match="eval.mode=slide") as exc:
        evaluate_heldout(learner, val, 2, settings, CPU, 0)
    assert PATCH_MODE_FIX in str(exc.value)
    scored = evaluate_heldout(learner, val, 2, settings, CPU, 0, validation=True)
    assert scored["datasets"][VESSELS["a"]]["window"] == [16, 16]  # slid over the whole image
    assert scored["protocol"]["mode"] == "resize" and "validation" not in as_json(scored["protocol"])
