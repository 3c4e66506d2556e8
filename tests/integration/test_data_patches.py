"""A run on patches (data=binary_patches on tiny vessel-like folders): 16 px training tasks,
held-out and validation images scored whole by sliding window."""

import json

from metaseg.data.mix import build_mix
from metaseg.data.tasks import TaskSampler
from metaseg.engine.training.trainer import train
from tests.helpers import VESSELS as NAMES
from tests.helpers import patch_cfg as cfg_for


def test_training_tasks_and_slide_evaluation_end_to_end(vessel_root, tmp_path):
    cfg = cfg_for(vessel_root, "trainer.max_steps=2", "trainer.eval_every=0", "meta.inner_steps=1", "meta.shots=2",
                  "meta.query=2", "eval.shots=1", "eval.episodes=2", "eval.mode=slide", "eval.support_patches=2",
                  "eval.pictures=0", "trainer.monitor_tasks=0", "data.val_fraction=0.34", "eval.val_episodes=1",
                  "model.extra.decoder_channels=[8,8,8]", "trainer.device=cpu")
    mix = build_mix(cfg.data, validation=True)
    task = TaskSampler(mix.train, mix.weights, 2, 2, 0).sample()
    assert task.support[0].shape == (2, 3, 16, 16)
    train(cfg, tmp_path / "run")
    result = json.loads((tmp_path / "run" / "metrics.json").read_text())
    held = result["datasets"][NAMES["c"]]
    assert held["window"] == [16, 16] and held["adapted"]["episodes"] == 2
    for name in (NAMES["a"], NAMES["b"]):  # validation images scored whole too, not by a centre patch
        val = result["val"]["datasets"][name]
        assert val["window"] == [16, 16]  # only a sliding-window score records its window

