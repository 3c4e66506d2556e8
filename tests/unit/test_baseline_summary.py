"""The random-init baseline beside the trained scores (eval.baseline) and the summary a run ends with.

A training run with and without it: tests/integration/test_baseline_summary.py.
"""

import json
import logging
import statistics

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from metaseg.config import EvalConfig, MetaConfig, ModelConfig
from metaseg.engine.evaluation import checkpoint_eval, summary
from metaseg.engine.evaluation.baseline import evaluate_baseline
from metaseg.engine.evaluation.protocol import episode_rng, evaluate_dataset
from metaseg.engine.load import random_init
from metaseg.engine.training.stages import stage_config
from metaseg.meta.from_config import make_learner
from metaseg.meta.precision import Precision
from metaseg.models.factory import build_model
from metaseg.utils.runtime import seed_everything
from tests.helpers import CPU, ROOT, TINY, as_json, compose_cfg, load_script, seeded_checkpoint, synthetic_heldout

SMALL_MODEL = {"encoder_depth": 3, "decoder_channels": [8, 8, 8]}


# -- the baseline itself ------------------------------------------------------------------
@pytest.fixture(scope="module")
def heldout():
    return synthetic_heldout(8)


def small_setup():
    model_cfg = OmegaConf.structured(ModelConfig(extra=SMALL_MODEL))
    meta_cfg = OmegaConf.structured(MetaConfig(inner_steps=1, inner_lr=0.1))
    eval_cfg = OmegaConf.structured(EvalConfig(shots=[1, 2], episodes=2, batch_size=8, pictures=2,
                                               curve_steps=[0, 1]))
    return model_cfg, meta_cfg, eval_cfg


def test_baseline_is_the_seeded_random_model_on_the_same_episodes_with_the_same_adaptation(heldout):
    model_cfg, meta_cfg, eval_cfg = small_setup()
    adaptation = lambda m: make_learner(m, meta_cfg, Precision("32", "cpu"))  # noqa: E731
    torch.manual_seed(123)
    streams = torch.get_rng_state()
    base = evaluate_baseline(adaptation, model_cfg, {"synth_4": heldout}, 4, eval_cfg, CPU, seed=3)
    assert torch.equal(torch.get_rng_state(), streams)  # no random stream of the caller moved

    # independently: the model drawn right after seeding, through the protocol on the same dataset
    seed_everything(3)
    learner = adaptation(build_model(model_cfg, 4))
    plain_cfg = OmegaConf.merge(eval_cfg, {"pictures": 0, "curve_steps": []})  # no figures for the baseline
    expected = evaluate_dataset(learner, "synth_4", heldout, 4, plain_cfg, CPU, seed=3)
    assert as_json(base["datasets"]["synth_4"]) == as_json(expected)
    assert "curve" not in base["datasets"]["synth_4"]
    assert base["init"] == "random" and base["seed"] == 3
    assert base["mean"]["adapted_miou"] == pytest.approx(expected["adapted"]["miou"]["mean"])

    # the episodes are the trained model's: drawn from (seed, dataset, episode), the model plays no part
    for k in ("1", "2"):
        a = base["datasets"]["synth_4"]["adapted"][k]
        assert [ep["support"] for ep in a["per_episode"]] == [list(episode_rng(3, "synth_4", e).permutation(8)[:int(k)])
                                                             for e in range(2)]
        assert (a["scored"], a["adapt_steps"], a["adapt_lr"]) == (8 - 2, 1, 0.1)  # the meta config's K and alpha

    # seeded: the same seed draws the same weights, another seed others
    same, moved = random_init(model_cfg, 4, 3), random_init(model_cfg, 4, 4)
    weights = learner.model.state_dict()
    assert all(torch.equal(same.state_dict()[n], weights[n]) for n in weights)
    assert not all(torch.equal(moved.state_dict()[n], weights[n]) for n in weights)


# -- metaseg-eval ------------------------------------------------------------------------
CKPT_DATA = ["data.size=32", "data.heldout=[synth_4]", "data.datasets.synth_4.num_images=6",
             "model.extra.decoder_channels=[8,8,8]", "meta.inner_steps=1", "meta.inner_lr=0.05"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small trained-looking checkpoint (seeded weights other than the baseline's draw)."""
    cfg = compose_cfg("train", [*TINY, "trainer.device=cpu", *CKPT_DATA])
    return seeded_checkpoint(tmp_path_factory.mktemp("ckpt") / "last.pt", cfg, seed=11, step=3)


EVAL = ["device=cpu", "eval.shots=[1,2]", "eval.episodes=2", "eval.batch_size=8"]


def test_eval_sets_the_checkpoint_none_model_beside_the_checkpoint(checkpoint, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="metaseg")
    on = checkpoint_eval.evaluate_checkpoint(
        compose_cfg("eval", [f"checkpoint={checkpoint}", *EVAL, "eval.pictures=1", "eval.baseline=true"]),
        tmp_path / "on")
    # the baseline is metaseg-eval checkpoint=none with the checkpoint's model, meta and data
    none = checkpoint_eval.evaluate_checkpoint(
        compose_cfg("eval", ["checkpoint=none", "data=synthetic", *CKPT_DATA, *EVAL, "eval.pictures=0"]),
        tmp_path / "none")
    saved = json.loads((tmp_path / "on" / "eval.json").read_text())
    assert saved["baseline"]["datasets"] == json.loads((tmp_path / "none" / "eval.json").read_text())["datasets"]
    assert saved["baseline"]["seed"] == 0 and "baseline" not in none  # no baseline of the baseline
    assert saved["datasets"]["synth_4"]["zero_shot"] != saved["baseline"]["datasets"]["synth_4"]["zero_shot"]

    md = (tmp_path / "on" / "eval.md").read_text()
    assert md.index("## Against a random initialisation") < md.index("## mIoU (%), dataset reduction")
    rows = summary.rows(on)
    two = next(r for r in rows if r.setting == "2-shot")
    a = on["datasets"]["synth_4"]["adapted"]["2"]["miou"]
    b = on["baseline"]["datasets"]["synth_4"]["adapted"]["2"]["miou"]
    assert two.difference == pytest.approx(a["mean"] - b["mean"])
    # paired over the same episodes: the interval of the per-episode differences, recomputed here
    pa = on["datasets"]["synth_4"]["adapted"]["2"]["per_episode"]
    pb = on["baseline"]["datasets"]["synth_4"]["adapted"]["2"]["per_episode"]
    assert [p["support"] for p in pa] == [p["support"] for p in pb]
    diffs = [p["miou"] - q["miou"] for p, q in zip(pa, pb)]
    half = 1.96 * statistics.stdev(diffs) / len(diffs) ** 0.5
    assert two.paired_ci == pytest.approx(half)
    assert two.beyond_cis == (abs(a["mean"] - b["mean"]) > half)
    line = next(x for x in md.splitlines() if x.startswith("| synth_4 | 2-shot"))
    assert f"{100 * a['mean']:.1f} ± {100 * a['ci95']:.1f}" in line
    assert f"{100 * (a['mean'] - b['mean']):+.1f} ± {100 * half:.1f}" in line
    logged = caplog.text
    assert "| synth_4 | 2-shot" in logged and "Where to look next:" in logged
    assert f"pictures    {tmp_path / 'on' / 'pictures' / 'synth_4.png'}" in logged


def test_eval_baseline_false_runs_no_baseline(checkpoint, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="metaseg")

    def refuse(*args, **kwargs):
        raise AssertionError("eval.baseline=false ran the baseline")

    monkeypatch.setattr(checkpoint_eval, "evaluate_baseline", refuse)
    off = checkpoint_eval.evaluate_checkpoint(
        compose_cfg("eval", [f"checkpoint={checkpoint}", *EVAL, "eval.pictures=0", "eval.baseline=false"]),
        tmp_path / "off")
    assert "baseline" not in off and "baseline" not in json.loads((tmp_path / "off" / "eval.json").read_text())
    assert "random initialisation" not in (tmp_path / "off" / "eval.md").read_text()
    assert "eval.baseline=false: no random-init baseline" in caplog.text


# -- the summary text ---------------------------------------------------------------------
def _scores(miou, fg=None):
    out = {"miou": miou, "mf1": miou}
    if fg is not None:
        out["fg_dice"] = fg
    return out


def _adapted(k, mean, ci, episodes=5, fg=None):
    s = {"shots": k, "episodes": episodes, "adapt_steps": 3, "adapt_lr": 0.1,
         "miou": {"mean": mean, "ci95": ci}, "mf1": {"mean": mean, "ci95": ci}}
    if fg is not None:
        s["fg_dice"] = {"mean": fg[0], "ci95": fg[1]}
    return s


def _result(trained, random=None, fg=False):
    """A result as evaluate_heldout shapes it; ``trained``/``random``: name -> (zero, mean, ci)."""
    def datasets(spec):
        return {name: {"zero_shot": _scores(z, z if fg else None),
                       "adapted": {"5": _adapted(5, m, c, fg=(m, c) if fg else None)}}
                for name, (z, m, c) in spec.items()}

    out = {"protocol": {"episodes": 5}, "datasets": datasets(trained)}
    if random is not None:
        out["baseline"] = {"init": "random", "seed": 0, "datasets": datasets(random)}
    return out


def test_summary_table_rows_difference_and_intervals():
    result = _result({"synth_4": (0.099, 0.264, 0.022), "synth_5": (0.1, 0.20, 0.03)},
                     {"synth_4": (0.03, 0.120, 0.015), "synth_5": (0.05, 0.19, 0.03)})
    lines = summary.table(result)
    assert lines[0].split("|")[1:-1] == [" dataset ", " setting   ", "    trained ", " random init ",
                                         " difference ", " beyond CIs "]
    row = [c.strip() for c in next(x for x in lines if x.startswith("| synth_4 | 5-shot")).split("|")[1:-1]]
    assert row == ["synth_4", "5-shot", "26.4 ± 2.2", "12.0 ± 1.5", "+14.4", "yes"]
    row = [c.strip() for c in next(x for x in lines if x.startswith("| synth_5 | 5-shot")).split("|")[1:-1]]
    assert row == ["synth_5", "5-shot", "20.0 ± 3.0", "19.0 ± 3.0", "+1.0", "no"]  # inside the intervals
    row = [c.strip() for c in next(x for x in lines if x.startswith("| synth_4 | zero-shot")).split("|")[1:-1]]
    assert row == ["synth_4", "zero-shot", "9.9", "3.0", "+6.9", "–"]  # one score each: no interval
    assert len({len(x) for x in lines}) == 1  # padded columns: a table in a terminal too

    text = summary.render(result, [("run folder", "outputs/x"), ("tensorboard", "tensorboard --logdir outputs/x")])
    assert "Held-out mIoU (%); k-shot: mean ± 95% CI over 5 episodes; adaptation: 3 steps at lr 0.1." in text
    assert "meta=erm" in text and text.rstrip().endswith("tensorboard --logdir outputs/x")
    assert len(text.splitlines()) < 40  # one screen


def test_summary_without_baseline_binary_metric_and_one_episode():
    only = summary.table(_result({"synth_4": (0.1, 0.3, 0.02)}))
    assert only[0].split("|")[1:-1] == [" dataset ", " setting   ", "    trained "]
    binary = _result({"drive": (0.5, 0.7, 0.01)}, {"drive": (0.1, 0.2, 0.01)}, fg=True)
    assert summary.headline_metric(binary) == "fg_dice" and "foreground Dice" in summary.caption(binary)[0]
    single = _result({"synth_4": (0.1, 0.3, 0.0)}, {"synth_4": (0.1, 0.1, 0.0)})
    for spec in (single["datasets"], single["baseline"]["datasets"]):
        spec["synth_4"]["adapted"]["5"]["episodes"] = 1  # one episode: a zero-width interval says nothing
    assert summary.rows(single)[1].beyond_cis is None
    assert "No held-out datasets" in summary.render({"datasets": {}}, [("run folder", "x")])


# -- where it is off ----------------------------------------------------------------------
def _raw(overrides):
    with initialize_config_module(config_module="metaseg.conf", version_base="1.3"):
        return compose("train", overrides)


def test_on_by_default_off_in_the_study_presets_and_the_first_stage():
    assert _raw([]).eval.baseline is True
    with initialize_config_module(config_module="metaseg.conf", version_base="1.3"):
        assert compose("eval", ["checkpoint=x"]).eval.baseline is True
    for experiment in ("converged", "converged_meta", "converged_gpu", "lodo"):
        assert _raw([f"experiment={experiment}"]).eval.baseline is False, experiment
    assert stage_config(_raw(["experiment=two_stage"])).eval.baseline is False
    study = load_script("study")
    args = type("Args", (), {"data_root": "d", "seed": 0, "set": []})()
    assert "eval.baseline=false" in study.zero_shot_command("retina_drive", ROOT / "run", args)
