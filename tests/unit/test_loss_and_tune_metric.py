"""meta.loss=ce_dice against a hand computation, and eval.tune_metric on a binary label space."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metaseg.data.mix import build_mix
from metaseg.engine.evaluation.tune import tune_adaptation
from metaseg.engine.evaluation.validation import evaluate_validation
from metaseg.meta.from_config import make_learner
from metaseg.meta.losses import ce_dice
from metaseg.meta.precision import Precision
from metaseg.models.factory import build_model
from metaseg.utils.errors import ConfigError
from metaseg.utils.runtime import seed_everything
from tests.helpers import TINY, compose_cfg
from tests.helpers import patch_cfg as cfg_for


def _reference(logits: np.ndarray, masks: np.ndarray) -> float:
    """Loops over pixels: mean cross-entropy of labelled pixels, plus 1 - soft Dice per non-background class."""
    n, c, h, w = logits.shape
    ce, count = 0.0, 0
    inter, psum, tsum = np.zeros(c), np.zeros(c), np.zeros(c)
    for i in range(n):
        for y in range(h):
            for x in range(w):
                t = masks[i, y, x]
                if t == 255:
                    continue
                z = logits[i, :, y, x]
                p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
                ce -= math.log(p[t])
                count += 1
                for k in range(1, c):
                    inter[k] += p[k] * (t == k)
                    psum[k] += p[k]
                    tsum[k] += t == k
    dice = [1 - (2 * inter[k] + 1) / (psum[k] + tsum[k] + 1) for k in range(1, c)]
    return ce / count + float(np.mean(dice))


def test_ce_dice_matches_a_hand_computation_and_is_twice_differentiable():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    masks = torch.randint(0, 3, (2, 5, 4), generator=g)
    masks[0, :2] = 255
    assert float(ce_dice(logits, masks).detach()) == pytest.approx(_reference(logits.detach().numpy(), masks.numpy()), abs=1e-10)
    assert torch.autograd.gradgradcheck(ce_dice, (logits, masks))  # MAML differentiates the inner gradient
    # perfect, confident predictions: cross-entropy and Dice both go to zero
    sure = F.one_hot(masks.clamp(max=2), 3).movedim(-1, 1).double() * 50
    assert float(ce_dice(sure, masks)) < 0.05


def test_unknown_loss_names_the_key():
    cfg = compose_cfg("train", [*TINY, "meta.loss=dice_only"])
    with pytest.raises(ConfigError, match="meta.loss='dice_only' is not one of ce, ce_dice"):
        make_learner(build_model(cfg.model, 4), cfg.meta, Precision("32"))


def test_tune_metric_fg_dice_ranks_by_foreground_dice(vessel_root):
    cfg = cfg_for(vessel_root, "data.val_fraction=0.34", "eval.shots=1", "eval.tune_lrs=[0.01,1.0]",
                  "eval.tune_steps=[2]", "eval.tune_episodes=1", "eval.tune_metric=fg_dice",
                  "model.extra.decoder_channels=[8,8,8]", "eval.max_images=2")
    mix = build_mix(cfg.data, validation=True)
    seed_everything(0)
    learner = make_learner(build_model(cfg.model, 2), cfg.meta, Precision("32"))
    record = tune_adaptation(learner, mix.val, 2, cfg.eval, torch.device("cpu"), 0, mix.classes)
    assert record["metric"].startswith("validation mean.adapted_fg_dice")
    for row in record["grid"]:  # each score is the validation tasks' mean foreground Dice at that point
        res = evaluate_validation(learner, mix.val, 2, cfg.eval, torch.device("cpu"), 0, mix.classes,
                                  adapt_lr=row["adapt_lr"], adapt_steps=row["adapt_steps"], episodes=1, shots=1)
        assert row["score"] == pytest.approx(res["mean"]["adapted_fg_dice"], abs=1e-12)
        assert res["mean"]["adapted_fg_dice"] != res["mean"]["adapted_miou"]
    best = max(record["grid"], key=lambda r: r["score"])
    assert record["chosen"] == {"adapt_lr": best["adapt_lr"], "adapt_steps": best["adapt_steps"]}


def test_foreground_tune_metric_on_a_multiclass_mix_is_a_clear_error():
    cfg = compose_cfg("train", [*TINY, "eval.tune_metric=fg_dice", "eval.tune_lrs=[0.1]", "eval.tune_steps=[1]",
                                "eval.tune_episodes=1"])
    mix = build_mix(cfg.data, validation=True)
    learner = make_learner(build_model(cfg.model, mix.num_classes), cfg.meta, Precision("32"))
    with pytest.raises(ConfigError, match="eval.tune_metric=fg_dice is a foreground score of binary label spaces"):
        tune_adaptation(learner, mix.val, mix.num_classes, cfg.eval, torch.device("cpu"), 0, mix.classes)
    with pytest.raises(ConfigError, match="eval.tune_metric='dice' is not one of"):
        cfg.eval.tune_metric = "dice"
        tune_adaptation(learner, mix.val, mix.num_classes, cfg.eval, torch.device("cpu"), 0, mix.classes)


def test_tune_datasets_scores_only_the_named_validation_sets(vessel_root):
    cfg = cfg_for(vessel_root, "data.val_fraction=0.34", "eval.shots=1", "eval.tune_lrs=[0.01,1.0]",
                  "eval.tune_steps=[2]", "eval.tune_episodes=1", "eval.tune_metric=fg_dice",
                  "model.extra.decoder_channels=[8,8,8]", "eval.max_images=2", "eval.tune_datasets=[retina_stare]")
    mix = build_mix(cfg.data, validation=True)
    assert set(mix.val) == {"retina_drive", "retina_stare"}
    seed_everything(0)
    learner = make_learner(build_model(cfg.model, 2), cfg.meta, Precision("32"))
    record = tune_adaptation(learner, mix.val, 2, cfg.eval, torch.device("cpu"), 0, mix.classes)
    assert record["datasets"] == ["retina_stare"]
    for row in record["grid"]:  # the score is retina_stare's alone, not the mean with retina_drive
        res = evaluate_validation(learner, {"retina_stare": mix.val["retina_stare"]}, 2, cfg.eval,
                                  torch.device("cpu"), 0, mix.classes, adapt_lr=row["adapt_lr"],
                                  adapt_steps=row["adapt_steps"], episodes=1, shots=1)
        assert row["score"] == pytest.approx(res["mean"]["adapted_fg_dice"], abs=1e-12)
    cfg.eval.tune_datasets = ["retina_chasedb1"]  # held out: it has no validation tasks
    with pytest.raises(ConfigError, match="eval.tune_datasets: 'retina_chasedb1' has no validation tasks"):
        tune_adaptation(learner, mix.val, 2, cfg.eval, torch.device("cpu"), 0, mix.classes)
