"""Budget accounting: images through forward and backward passes, checked against a hand count."""

import json

import pytest
import torch

from metaseg.data import build_mix
from metaseg.data.tasks import TaskSampler
from metaseg.engine.training.budget import Budget, run_budget
from metaseg.meta.from_config import make_learner
from metaseg.meta.precision import Precision
from metaseg.models.factory import build_model
from metaseg.utils.runtime import seed_everything
from tests.conftest import TINY, compose_cfg

MB, SHOTS, QUERY = 2, 2, 2


def _count(algorithm, inner_steps, log, backend="higher"):
    cfg = compose_cfg("train", [*TINY, f"meta={algorithm}", f"meta.inner_steps={inner_steps}",
                                f"meta.backend={backend}", f"meta.meta_batch={MB}", f"meta.shots={SHOTS}",
                                f"meta.query={QUERY}"])
    mix = build_mix(cfg.data)
    seed_everything(0)
    model = build_model(cfg.model, mix.num_classes)
    learner = make_learner(model, cfg.meta, Precision("32"), max_steps=2)
    sampler = TaskSampler(mix.train, mix.weights, SHOTS, QUERY, seed=0)
    optimizer, scaler = learner.make_optimizer(), Precision("32").grad_scaler()
    budget = Budget(model)
    model(torch.zeros(2, 3, 32, 32))  # outside counting(): not counted
    with budget.counting():
        learner.meta_step(sampler, optimizer, scaler, 1, log=log)
    return budget.counts()


# Hand count per outer step, meta_batch tasks of S support and Q query images, K inner steps:
#   erm:    K support updates + 1 query update, each a forward and a backward of every task's batch
#   fomaml: K support forwards (each with its inner gradient) + 1 query forward, one backward each
#   maml:   as fomaml, plus the outer backward going back through the K support forwards again
#   log=True adds the query loss before adaptation: Q forward images per task, no backward
@pytest.mark.parametrize("algorithm, k, log, forward, backward", [
    ("erm", 1, False, MB * (SHOTS + QUERY), MB * (SHOTS + QUERY)),
    ("erm", 2, True, MB * (2 * SHOTS + QUERY + QUERY), MB * (2 * SHOTS + QUERY)),
    ("fomaml", 1, False, MB * (SHOTS + QUERY), MB * (SHOTS + QUERY)),
    ("maml", 1, False, MB * (SHOTS + QUERY), MB * (2 * SHOTS + QUERY)),
    ("maml", 2, True, MB * (2 * SHOTS + QUERY + QUERY), MB * (2 * 2 * SHOTS + QUERY)),
])
def test_counters_match_a_hand_count(algorithm, k, log, forward, backward):
    assert _count(algorithm, k, log) == {"forward_images": forward, "backward_images": backward, "outer_steps": 1}


def test_both_inner_loop_backends_count_the_same():
    assert _count("maml", 2, False, backend="func") == _count("maml", 2, False, backend="higher")


def test_budget_file_adds_the_stages():
    b = Budget(torch.nn.Conv2d(3, 3, 1))
    b.forward_images, b.backward_images, b.outer_steps, b.train_seconds = 10, 6, 2, 1.5
    out = run_budget(b, 3.0, {"pretrain": {"total": {"forward_images": 4, "backward_images": 4, "outer_steps": 1,
                                                     "train_seconds": 0.5, "seconds": 1.0}}})
    assert out["total"] == {"forward_images": 14, "backward_images": 10, "outer_steps": 3, "train_seconds": 2.0,
                            "seconds": 4.0}


def test_a_run_writes_its_budget(tmp_path):
    from metaseg.engine.training.trainer import train
    cfg = compose_cfg("train", [*TINY, "trainer.device=cpu", "trainer.max_steps=2", "trainer.eval_every=0",
                                "eval.episodes=1", "eval.pictures=0", "trainer.monitor_tasks=0", "meta=erm",
                                "meta.inner_steps=1", "trainer.log_every=100"])
    metrics = train(cfg, tmp_path)
    # smoke: 2 tasks of 2 + 2 images, K=1: 8 forward and 8 backward images per step; step 2 is logged (+4)
    assert metrics["budget"] == {"forward_images": 8 + 12, "backward_images": 16, "outer_steps": 2}
    saved = json.loads((tmp_path / "budget.json").read_text())
    assert saved["total"]["forward_images"] == 20 and saved["total"]["train_seconds"] > 0


def test_report_shows_both_budget_views(tmp_path):
    from metaseg.report import find_runs, table
    for name, fwd, secs in (("a", 100, 2.5), ("b", 300, 1.0)):
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({"mean": {"adapted_miou": 0.5}, "objective": 0.5,
                                                    "budget": {"forward_images": fwd, "backward_images": fwd // 2,
                                                               "outer_steps": 2}}))
        (d / "budget.json").write_text(json.dumps({"total": {"forward_images": fwd, "train_seconds": secs / 2,
                                                             "seconds": secs}}))
    header, rows = table(find_runs(tmp_path), "mean.adapted_miou", "max")
    cols = {h: i for i, h in enumerate(header)}
    assert {"budget.forward_images", "budget.backward_images", "budget.train_seconds", "budget.seconds"} <= set(cols)
    got = {r[cols["run"]]: (r[cols["budget.forward_images"]], r[cols["budget.seconds"]]) for r in rows}
    assert got == {"a": (100.0, 2.5), "b": (300.0, 1.0)}
