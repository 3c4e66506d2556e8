"""Every algorithm through the real training and evaluation path, at smoke sizes.

``metaseg-train meta=NAME`` for every YAML of ``conf/meta/``, in process (``train`` on a
composed config); Meta-SGD's step sizes in the checkpoint and in ``metaseg-eval``; training
first order on an encoder without a second derivative; a diverging inner loop. The guards
that stop a run before training, the second-order probe and cross-dataset tasks:
tests/unit/test_algorithms_train.py.
"""

import logging
import math

import pytest
import torch

from metaseg.engine.checkpoint import save_checkpoint
from metaseg.engine.evaluation.checkpoint_eval import evaluate_checkpoint
from metaseg.engine.training.trainer import train
from metaseg.meta import DivergenceError
from tests.helpers import ROOT, SMALL_DECODER, TINY, compose_cfg

NAMES = sorted(p.stem for p in (ROOT / "conf" / "meta").glob("*.yaml"))
# one outer step of a lighter U-Net, and the evaluation at its end scores zero-shot only: what a run
# of each algorithm needs
SHORT = ["trainer.max_steps=1", "trainer.eval_every=0", "eval.episodes=0", "eval.pictures=0",
         "trainer.monitor_tasks=0", "trainer.best_metric=val.mean.zero_shot_miou", SMALL_DECODER]


@pytest.fixture(scope="module")
def run_of(tmp_path_factory):
    """``run_of(NAME)``: ``metaseg-train meta=NAME`` at smoke size (SHORT), trained once per module."""
    runs = {}

    def run(name):
        if name not in runs:
            cfg = compose_cfg("train", [*TINY, "trainer.device=cpu", f"meta={name}", *SHORT])
            folder = tmp_path_factory.mktemp(name)
            runs[name] = cfg, train(cfg, folder), folder / "checkpoints" / "last.pt"
        return runs[name]
    return run


@pytest.mark.parametrize("name", NAMES)
def test_metaseg_train_meta_name_runs_and_checkpoints(run_of, name):
    cfg, metrics, path = run_of(name)
    assert metrics["step"] == 1 and 0 <= metrics["objective"] <= 1
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["config"]["meta"]["algorithm"] == cfg.meta.algorithm
    learned = cfg.meta.learn_inner_lr or cfg.meta.algorithm == "metasgd"
    assert bool(ckpt["meta_state"]) == learned
    if learned:  # meta-learned: moved away from alpha by the outer step
        sizes = ckpt["meta_state"]["step_sizes"]
        assert sizes and all(isinstance(v, torch.Tensor) for v in sizes.values())
        assert any(not torch.allclose(v, torch.full_like(v, cfg.meta.inner_lr)) for v in sizes.values())


def test_metasgd_step_sizes_are_restored_by_metaseg_eval(run_of, tmp_path):
    _, _, path = run_of("metasgd")
    ecfg = lambda p: compose_cfg("eval", [f"checkpoint={p}", "device=cpu", "eval.shots=2", "eval.episodes=2"])  # noqa: E731
    first = evaluate_checkpoint(ecfg(path), tmp_path / "e1")
    again = evaluate_checkpoint(ecfg(path), tmp_path / "e2")
    assert first["datasets"] == again["datasets"]
    ckpt = torch.load(path, weights_only=True)
    ckpt["meta_state"]["step_sizes"] = {k: v * 3 for k, v in ckpt["meta_state"]["step_sizes"].items()}
    save_checkpoint(tmp_path / "tampered.pt", **ckpt)  # a new digest: torch.save would keep the old one
    other = evaluate_checkpoint(ecfg(tmp_path / "tampered.pt"), tmp_path / "e3")
    zero = lambda r: {n: d["zero_shot"] for n, d in r["datasets"].items()}  # noqa: E731
    assert zero(other) == zero(first)  # same theta...
    assert other["mean"]["adapted_miou"] != first["mean"]["adapted_miou"]  # ...adapted with the saved rates
    del ckpt["meta_state"]
    save_checkpoint(tmp_path / "stripped.pt", **ckpt)
    from metaseg.utils.errors import CheckpointError
    with pytest.raises(CheckpointError, match="no meta_state.step_sizes"):
        evaluate_checkpoint(ecfg(tmp_path / "stripped.pt"), tmp_path / "e4")


MOBILENET = ["model.encoder=tu-mobilenetv3_small_050", *SHORT]


def test_second_order_fallback_trains_first_order_with_a_warning(tiny_cfg, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="metaseg"):
        metrics = train(tiny_cfg(*MOBILENET, "meta.second_order_fallback=true"), tmp_path)
    assert any("training first order instead" in r.getMessage() for r in caplog.records)
    assert math.isfinite(metrics["objective"])


def test_anil_stays_second_order_on_such_an_encoder_when_its_layers_are_not_adapted(tiny_cfg, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="metaseg"):
        metrics = train(tiny_cfg(*MOBILENET, "meta=anil"), tmp_path)
    assert math.isfinite(metrics["objective"]) and not any("first order" in r.getMessage() for r in caplog.records)


def test_diverging_inner_loop_stops_the_run_with_advice(tiny_cfg, tmp_path):
    with pytest.raises(DivergenceError, match=r"smaller meta.inner_lr \(now 1e\+30\)"):
        train(tiny_cfg("meta.inner_lr=1e30", "trainer.max_steps=4", "trainer.eval_every=0"), tmp_path)
    assert not (tmp_path / "metrics.json").exists()
