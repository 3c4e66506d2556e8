"""metaseg-train with and without the random-init baseline: it comes at the end, in the summary, and
the trained model's numbers do not move. The baseline and the summary themselves:
tests/unit/test_baseline_summary.py."""

import json
import logging

import torch

from metaseg.engine.training.trainer import train
from tests.helpers import TINY, as_json, compose_cfg

QUICK_TRAIN = [*TINY, "trainer.device=cpu", "trainer.max_steps=1", "trainer.eval_every=0", "trainer.ckpt_every=1",
               "trainer.monitor_tasks=0", "model.extra.decoder_channels=[8,8,8]", "eval.episodes=2",
               "eval.pictures=0", "eval.val_episodes=1", "data.heldout=[synth_4]"]


def test_training_gets_the_baseline_at_the_end_and_its_numbers_do_not_move(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="metaseg")
    on = train(compose_cfg("train", [*QUICK_TRAIN, "eval.baseline=true"]), tmp_path / "on")
    off = train(compose_cfg("train", [*QUICK_TRAIN, "eval.baseline=false"]), tmp_path / "off")
    metrics = json.loads((tmp_path / "on" / "metrics.json").read_text())
    assert set(metrics["baseline"]["datasets"]) == {"synth_4"} and "baseline" not in off
    for key in ("datasets", "mean", "val", "objective"):  # the trained model's numbers are the same
        assert as_json(on[key]) == as_json(off[key]), key
    a, b = (torch.load(tmp_path / run / "checkpoints" / "last.pt") for run in ("on", "off"))
    assert all(torch.equal(a["model"][n], b["model"][n]) for n in a["model"])
    text = caplog.text
    assert text.count("==== summary ====") == 2
    assert "| synth_4 | 2-shot" in text and "random init" in text
    assert f"tensorboard --logdir {tmp_path / 'on'}  (" in text and f"checkpoint={tmp_path / 'on'}" in text
    assert "eval.baseline=false: no random-init baseline" in text  # the second run says why it has none

