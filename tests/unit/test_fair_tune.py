"""eval.tune: the grid is scored on validation tasks, the best point evaluates the held-out datasets.

The choice a training run records: tests/integration/test_fair_tune.py.
"""

import copy
import json
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metaseg.data import build_mix
from metaseg.engine.evaluation.checkpoint_eval import evaluate_checkpoint
from metaseg.engine.evaluation.tune import tune_adaptation, tune_grid
from metaseg.meta.from_config import make_learner
from metaseg.meta.precision import Precision
from metaseg.metrics import ConfusionMatrix
from metaseg.models.factory import build_model
from metaseg.utils.errors import ConfigError
from metaseg.utils.runtime import seed_everything
from tests.helpers import TINY, compose_cfg

GRID = ["eval.tune_lrs=[0.0001,0.5]", "eval.tune_steps=[0,3]", "eval.tune_episodes=2"]


def _manual_score(model, val, k, episodes, lr, steps, seed):
    """Plain-PyTorch reference: SGD on the support from a copy, argmax on the query, dataset-reduction mIoU."""
    per_dataset = []
    for name, ds in val.items():
        scores = []
        for e in range(episodes):
            order = np.random.default_rng([seed, zlib.crc32(name.encode()), e]).permutation(len(ds))
            support, query = order[:k], sorted(order[k:].tolist())
            net = copy.deepcopy(model).train()
            opt = torch.optim.SGD(net.parameters(), lr=lr)
            xs, ys = (torch.stack(t) for t in zip(*(ds[int(i)] for i in support)))
            for _ in range(steps):
                opt.zero_grad()
                F.cross_entropy(net(xs), ys, ignore_index=255).backward()
                opt.step()
            xq, yq = (torch.stack(t) for t in zip(*(ds[i] for i in query)))
            with torch.no_grad():
                pred = net.eval()(xq).argmax(1)
            cm = ConfusionMatrix(4, 255)
            cm.update(pred, yq)
            scores.append(cm.compute("dataset")["miou"])
        per_dataset.append(np.mean(scores))
    return float(np.mean(per_dataset))


def test_tune_picks_the_grid_point_an_independent_computation_picks():
    cfg = compose_cfg("train", [*TINY, *GRID, "data.train=[synth_0,synth_1]"])  # two validation datasets
    assert tune_grid(cfg.eval) == [(0.0001, 0), (0.5, 0), (0.0001, 3), (0.5, 3)]
    mix = build_mix(cfg.data, validation=True)
    seed_everything(0)
    model = build_model(cfg.model, mix.num_classes)
    learner = make_learner(model, cfg.meta, Precision("32"))
    record = tune_adaptation(learner, mix.val, mix.num_classes, cfg.eval, torch.device("cpu"), 0, mix.classes)
    assert record["shots"] == 2 and record["episodes"] == 2 and record["datasets"] == list(mix.val)
    manual = [_manual_score(model, mix.val, 2, 2, lr, steps, 0) for lr, steps in tune_grid(cfg.eval)]
    got = [r["score"] for r in record["grid"]]
    assert len({round(s, 4) for s in got}) >= 2  # the grid points do differ
    assert got == pytest.approx(manual, abs=2e-3)
    assert got[0] == got[1]  # zero steps: the step size cannot matter, and the tie goes to the first
    best = int(np.argmax(manual))
    assert record["chosen"] == {"adapt_lr": tune_grid(cfg.eval)[best][0], "adapt_steps": tune_grid(cfg.eval)[best][1]}
    with pytest.raises(ConfigError, match="eval.tune_lrs"):
        tune_grid(compose_cfg("train", [*TINY, "eval.tune_lrs=[]"]).eval)
    with pytest.raises(ConfigError, match="needs validation tasks"):
        tune_adaptation(learner, {}, 4, cfg.eval, torch.device("cpu"), 0)


def test_metaseg_eval_records_the_tuned_choice_and_uses_it(tmp_path):
    sizes = [f"data.datasets.synth_{i}.num_images={16 if i < 4 else 8}" for i in range(6)]
    cfg = compose_cfg("eval", ["checkpoint=none", "data=synthetic", "data.size=32", *sizes, "eval.shots=2",
                               "eval.episodes=2", "eval.pictures=0", "eval.tune=true", "device=cpu", *GRID,
                               "data.train=[synth_1,synth_3]"])  # tuned on these two domains' validation tasks
    result = evaluate_checkpoint(cfg, tmp_path)
    saved = json.loads((tmp_path / "eval.json").read_text())
    chosen = saved["tune"]["chosen"]
    assert len(saved["tune"]["grid"]) == 4 and saved["tune"]["datasets"] == ["synth_1", "synth_3"]
    assert saved["protocol"]["adapt_lr"] == chosen["adapt_lr"]
    assert saved["protocol"]["adapt_steps"] == chosen["adapt_steps"]
    assert all(d["adapted"]["adapt_lr"] == chosen["adapt_lr"] for d in saved["datasets"].values())
    assert set(saved["datasets"]) == {"synth_4", "synth_5"} and result["tune"] == saved["tune"]


def test_learned_step_sizes_compete_in_the_grid():
    cfg = compose_cfg("train", [*TINY, "meta=metasgd", "eval.tune_lrs=[3.0]", "eval.tune_steps=[2]",
                                "eval.tune_episodes=1"])
    mix = build_mix(cfg.data, validation=True)
    seed_everything(0)
    learner = make_learner(build_model(cfg.model, mix.num_classes), cfg.meta, Precision("32"))
    with torch.no_grad():  # learned step sizes far from 3.0, so the two points differ
        for v in learner.step_sizes.values:
            v.fill_(1e-6)
    record = tune_adaptation(learner, mix.val, mix.num_classes, cfg.eval, torch.device("cpu"), 0)
    assert [(r["adapt_lr"], r["adapt_steps"]) for r in record["grid"]] == [(None, 2), (3.0, 2)]
    assert record["grid"][0]["score"] != record["grid"][1]["score"]
