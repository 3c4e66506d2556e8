"""Same seed and config give the same numbers on CPU."""

import json

from metaseg.engine.training.trainer import train


def test_same_seed_same_metrics(tiny_cfg, tmp_path):
    cfg = tiny_cfg("trainer.max_steps=3", "trainer.eval_every=0")
    m1 = train(cfg, tmp_path / "a")
    m2 = train(cfg, tmp_path / "b")
    drop = lambda m: {k: v for k, v in m.items() if k != "seconds"}  # noqa: E731
    assert drop(m1) == drop(m2)
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["datasets"] == \
        json.loads((tmp_path / "b" / "metrics.json").read_text())["datasets"]
    m3 = train(tiny_cfg("trainer.max_steps=3", "trainer.eval_every=0", "seed=1"), tmp_path / "c")
    assert m3["datasets"] != m1["datasets"]
