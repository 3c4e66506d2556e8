"""What a run writes of its budget: metrics.json's counts and budget.json's totals, on the shared
trained run. The counts per outer step against a hand count: tests/unit/test_fair_budget.py."""

import json

from tests.helpers import MB, QUERY, SESSION_STEPS, SHOTS


def test_a_run_writes_its_budget(trained):
    metrics = json.loads((trained.run_dir / "metrics.json").read_text())
    # maml, K=1 (experiment=smoke: 2 tasks of 2 + 2 images): per step MB * (SHOTS + QUERY) forward images and
    # MB * (2 * SHOTS + QUERY) backward ones (the outer backward goes back through the support forward);
    # trainer.log_every=1 logs every step, adding the query loss before adaptation: MB * QUERY forward images
    forward, backward = MB * (SHOTS + QUERY) + MB * QUERY, MB * (2 * SHOTS + QUERY)
    assert metrics["budget"] == {"forward_images": SESSION_STEPS * forward, "backward_images": SESSION_STEPS * backward,
                                 "outer_steps": SESSION_STEPS}
    saved = json.loads((trained.run_dir / "budget.json").read_text())
    assert saved["total"]["forward_images"] == SESSION_STEPS * forward and saved["total"]["train_seconds"] > 0
