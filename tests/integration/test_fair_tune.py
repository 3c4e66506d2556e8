"""eval.tune in a training run: the final evaluation records the grid and uses its choice. The tuning
itself: tests/unit/test_fair_tune.py."""

from metaseg.engine.training.trainer import train
from tests.helpers import TINY, compose_cfg


def test_train_time_tune_records_the_choice(tmp_path):
    cfg = compose_cfg("train", [*TINY, "trainer.device=cpu", "trainer.max_steps=1", "trainer.eval_every=0",
                                "eval.episodes=1", "eval.pictures=0", "trainer.monitor_tasks=0", "eval.tune=true",
                                "eval.tune_lrs=[0.05,0.2]", "eval.tune_steps=[1]", "eval.tune_episodes=1"])
    metrics = train(cfg, tmp_path)
    assert [r["adapt_lr"] for r in metrics["tune"]["grid"]] == [0.05, 0.2]
    assert metrics["protocol"]["adapt_lr"] == metrics["tune"]["chosen"]["adapt_lr"]
