"""Budget accounting: images through forward and backward passes, checked against a hand count.

What a run writes (budget.json, metrics.json's budget): tests/integration/test_fair_budget.py.
"""

import json

import pytest
import torch

from metaseg.engine.training.budget import Budget, run_budget
from tests.helpers import MB, QUERY, SHOTS
from tests.helpers import budget_count as _count


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
