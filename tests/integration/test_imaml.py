"""``metaseg-train meta=imaml`` at smoke size: it trains, evaluates and logs CG, and resuming the
finished run equals training longer. iMAML itself (closed forms, finite differences, CG, backends,
precision, the outer-step paths): tests/unit/test_imaml.py."""

import torch

from metaseg.engine.checkpoint import load_checkpoint
from metaseg.engine.training.trainer import train
from tests.helpers import copy_run, scalars

COMMON = ["meta=imaml", "trainer.eval_every=0", "eval.pictures=0", "eval.max_images=2",
          "trainer.monitor_tasks=0", "trainer.best_metric=val.mean.zero_shot_miou"]


def test_metaseg_train_meta_imaml_trains_logs_cg_and_resumes_exactly(tiny_cfg, tmp_path):
    metrics = train(tiny_cfg(*COMMON, "eval.episodes=1", "trainer.max_steps=2"), tmp_path / "two")
    assert metrics["step"] == 2 and 0 <= metrics["objective"] <= 1
    assert all("adapted" in r for r in metrics["datasets"].values())
    for tag in ("train/cg_residual", "train/inner_grad_norm", "train/query_loss_after"):
        values = [v for _, v in scalars(tmp_path / "two", tag)]
        assert len(values) == 2 and all(v == v for v in values), tag
    # resuming the finished run equals training longer (the evaluation at their end: zero-shot only)
    run = copy_run(tmp_path / "two", tmp_path / "extended")
    extended = train(tiny_cfg(*COMMON, "eval.episodes=0", "trainer.max_steps=3", "trainer.resume=auto"), run)
    longer = train(tiny_cfg(*COMMON, "eval.episodes=0", "trainer.max_steps=3"), tmp_path / "longer")
    assert extended["datasets"] == longer["datasets"] and extended["budget"] == longer["budget"]
    a = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "longer" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
