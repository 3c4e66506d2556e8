"""best.pt by the configured held-out metric, the tensorboard diagnostics, the progress bar."""

import io
import math

import numpy as np
import pytest
import torch

from metaseg.engine.checkpoint import load_checkpoint
from metaseg.engine.training.best import BestTracker, metric_value
from metaseg.engine.training.monitor import outer_grad_norm, progress
from metaseg.engine.training.trainer import train
from metaseg.utils.errors import ConfigError

SIZE = 32  # experiment=smoke's image size


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tests.conftest import TINY, compose_cfg
    d = tmp_path_factory.mktemp("logs") / "run"
    cfg = compose_cfg("train", [*TINY, "trainer.device=cpu", "trainer.max_steps=4", "trainer.eval_every=1",
                                "eval.pictures=2", "trainer.monitor_tasks=1", "eval.episodes=1",
                                "meta.outer_lr=0.003", "trainer.best_metric=mean.adapted_miou"])
    return d, train(cfg, d)


def _acc(d):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(d / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_best_checkpoint_is_the_step_with_the_best_heldout_metric(run):
    d, metrics = run
    acc = _acc(d)
    # the default best metric, mean.adapted_miou, recomputed from the per-dataset tensorboard scalars
    per_step = {}
    for name in ("synth_4", "synth_5"):
        for e in acc.Scalars(f"heldout/{name}/adapted_miou"):
            per_step.setdefault(e.step, []).append(e.value)
    means = {s: float(np.mean(v)) for s, v in per_step.items()}
    assert sorted(means) == [1, 2, 3, 4]
    best_step = max(means, key=means.get)
    assert metrics["best"]["step"] == best_step and metrics["best"]["metric"] == "mean.adapted_miou"
    assert math.isclose(metrics["best"]["value"], means[best_step], rel_tol=1e-5)
    best = load_checkpoint(d / "checkpoints" / "best.pt")
    assert best["step"] == best_step and best["best"]["step"] == best_step
    last = load_checkpoint(d / "checkpoints" / "last.pt")
    assert last["step"] == 4 and last["best"] == best["best"]
    same = all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])
    assert same == (best_step == 4)


def test_tensorboard_has_the_diagnostics(run):
    d, _ = run
    acc = _acc(d)
    tags = set(acc.Tags()["scalars"])
    assert {"train/outer_loss", "train/query_loss_before", "train/query_loss_after", "train/outer_grad_norm",
            "train/beta", "train/tasks_per_second", "monitor/query_loss_after_0_steps",
            "monitor/query_loss_after_1_steps", "heldout/synth_4/adapted_mf1"} <= tags
    assert [e.value for e in acc.Scalars("train/beta")] == pytest.approx([0.003] * 4)
    norms = [e.value for e in acc.Scalars("train/outer_grad_norm")]
    assert len(norms) == 4 and all(math.isfinite(n) and n > 0 for n in norms)
    assert all(e.value > 0 for e in acc.Scalars("train/tasks_per_second"))
    # the evaluation's picture grid: 2 image rows, each image | truth | zero-shot | adapted (and a legend)
    images = acc.Images("predictions/synth_4")
    assert [e.step for e in images] == [1, 2, 3, 4]
    assert images[0].height >= 2 * SIZE and images[0].width >= 4 * SIZE
    assert "predictions/synth_5" in acc.Tags()["images"]


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


def test_cli_stderr_has_no_progress_bar_when_not_a_terminal(tmp_path):
    from tests.conftest import run_cli
    out = run_cli("metaseg-train", "experiment=smoke", "trainer.device=cpu", "trainer.max_steps=1",
                  "eval.episodes=1", "eval.pictures=0", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "meta-train:" not in out.stderr and "it/s" not in out.stderr and "s/it" not in out.stderr
    log = (tmp_path / "r" / "train.log").read_text()
    assert "step 1/1" in log and "step 1/1" in out.stdout + out.stderr  # log file and console


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


def test_best_metric_that_the_evaluation_cannot_produce_stops_before_training(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match="needs adapted scores, but eval.shots=0"):
        train(tiny_cfg("eval.shots=0"), tmp_path / "x")
    with pytest.raises(ConfigError, match="is not in the evaluation result; available: "):
        train(tiny_cfg("trainer.max_steps=1", "trainer.best_metric=mean.nope", "eval.episodes=1",
                       "eval.pictures=0"), tmp_path / "y")
    assert (tmp_path / "y" / "checkpoints" / "last.pt").is_file()  # the final weights are kept
