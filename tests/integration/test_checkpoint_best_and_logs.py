"""A best metric the evaluation cannot produce: refused before training, or (named wrong) after it
with the final weights kept."""

import pytest

from metaseg.engine.training.trainer import train
from metaseg.utils.errors import ConfigError


def test_best_metric_that_the_evaluation_cannot_produce_stops_before_training(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match="needs adapted scores, but eval.shots=0"):
        train(tiny_cfg("eval.shots=0"), tmp_path / "x")
    with pytest.raises(ConfigError, match="is not in the evaluation result; available: "):
        train(tiny_cfg("trainer.max_steps=1", "trainer.best_metric=mean.nope", "eval.episodes=1",
                       "eval.pictures=0"), tmp_path / "y")
    assert (tmp_path / "y" / "checkpoints" / "last.pt").is_file()  # the final weights are kept
