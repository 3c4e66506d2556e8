"""best.pt's tracker, the outer gradient norm tensorboard logs, the progress bar.

A run's best.pt and tensorboard diagnostics: tests/integration/test_cli_end_to_end.py (the shared
run); a best metric the evaluation cannot produce: tests/integration/test_checkpoint_best_and_logs.py.
"""

import io
import math

import pytest
import torch

from metaseg.engine.training.best import BestTracker, metric_value
from metaseg.engine.training.monitor import outer_grad_norm, progress
from metaseg.utils.errors import ConfigError


def test_progress_bar_only_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    quiet = io.StringIO()
    assert list(progress(0, 3, file=quiet)) == [1, 2, 3] and quiet.getvalue() == ""
    tty = Terminal()
    assert list(progress(2, 5, file=tty)) == [3, 4, 5]  # a resumed run continues at step 3
    shown = tty.getvalue()
    assert "meta-train" in shown and "2/5" in shown and "5/5" in shown and "<" in shown  # ETA field


def test_outer_grad_norm_against_a_hand_computation():
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, 2, requires_grad=True)
    a.grad, b.grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([[0.0, 4.0], [0.0, 0.0]])
    c = torch.zeros(1, requires_grad=True)  # no gradient: skipped
    assert outer_grad_norm([a, b, c]) == pytest.approx(5.0)
    assert outer_grad_norm([a, b], scale=1024.0) == pytest.approx(5.0 / 1024)
    assert math.isnan(outer_grad_norm([c]))


def test_best_tracker_modes_nan_and_state():
    def result(v):
        return {"mean": {"adapted_miou": v}, "datasets": {"d": {"adapted": {"miou": {"mean": v, "ci95": 0}}}}}

    t = BestTracker("mean.adapted_miou", "max")
    assert t.update(result(0.2), 1) and not t.update(result(0.1), 2) and t.update(result(0.3), 3)
    assert not t.update(result(float("nan")), 4) and (t.value, t.step) == (0.3, 3)
    t2 = BestTracker("mean.adapted_miou", "min")
    t2.load_state_dict(t.state_dict())
    assert (t2.value, t2.step) == (0.3, 3) and t2.update(result(0.25), 5)
    assert metric_value(result(0.4), "datasets.d.adapted.miou") == 0.4  # {mean, ci95} reads its mean
    with pytest.raises(ConfigError, match=r"trainer.best_metric='mean.adapted_miuo' is not in the evaluation "
                                          r"result; available: mean.adapted_miou, datasets.d.adapted.miou.mean"):
        metric_value(result(0.1), "mean.adapted_miuo")
    with pytest.raises(ConfigError, match="best_mode='highest'"):
        BestTracker("x", "highest")
