"""Meta-validation split: reserved images never reach training tasks or held-out scores; early stopping.

That best.pt follows the validation scores of a run: tests/integration/test_cli_end_to_end.py
(test_best_checkpoint_is_the_step_with_the_best_validation_score, on the shared trained run).
"""


import numpy as np
import pytest
import torch

from metaseg.data import build_mix
from metaseg.data.splits import SplitPart, validation_indices
from metaseg.data.tasks import TaskSampler
from metaseg.engine.training.trainer import train
from metaseg.utils.errors import ConfigError
from tests.helpers import TINY, compose_cfg, folder_dataset


def _key(image: torch.Tensor) -> bytes:
    return image.numpy().tobytes()


def test_validation_images_never_appear_in_training_tasks_or_heldout():
    cfg = compose_cfg("train", TINY).data
    mix = build_mix(cfg, validation=True)
    assert set(mix.val) == set(mix.train) == {"synth_0", "synth_1", "synth_2", "synth_3"}
    for name in mix.train:
        tr, va = mix.train[name], mix.val[name]
        assert isinstance(tr, SplitPart) and isinstance(va, SplitPart) and tr.base is va.base
        # round(0.2 * 16) = 3 reserved, the rest trains; disjoint and covering the dataset
        assert len(va) == 3 and len(tr) == 13
        assert not set(tr.indices) & set(va.indices) and sorted(tr.indices + va.indices) == list(range(16))
    # the seeded draw: numpy.random.default_rng([data.seed, crc32(name)]).permutation(n)[:3]
    import zlib
    expect = sorted(np.random.default_rng([0, zlib.crc32(b"synth_2")]).permutation(16)[:3].tolist())
    assert mix.val["synth_2"].indices == expect
    val_images = {_key(mix.val[n][i][0]) for n in mix.val for i in range(len(mix.val[n]))}
    assert len(val_images) == 12
    sampler = TaskSampler(mix.train, mix.weights, shots=4, query=4, seed=0)
    seen = set()
    for _ in range(60):
        task = sampler.sample()
        for batch in (task.support[0], task.query[0]):
            seen.update(_key(img) for img in batch)
    assert len(seen) > 30 and not seen & val_images
    held = {_key(ds[i][0]) for ds in mix.heldout.values() for i in range(len(ds))}
    assert not held & val_images
    # the un-split mix still holds every image, so the reserved ones came out of training
    full = build_mix(cfg)
    assert len(full.train["synth_0"]) == 16 and not full.val


def test_splits_csv_reserves_exactly_its_val_rows(tmp_path):
    splits = ["train", "val", "train", "train", "val", "train"]
    folder_dataset(tmp_path, n=6, splits=splits)
    cfg = compose_cfg("train", ["data=folder", f"data.root={tmp_path}", "data.size=8", "data.workers=1",
                                "data.train=[folder]", "data.heldout=[]"]).data
    mix = build_mix(cfg, validation=True)
    assert mix.val["folder"].indices == [1, 4] and mix.train["folder"].indices == [0, 2, 3, 5]
    assert mix.val_how["folder"].startswith("splits.csv")
    stems = [mix.train["folder"].base.base.pairs[i].stem for i in mix.val["folder"].indices]
    assert stems == ["img1", "img4"]
    # no val rows named: a seeded fraction instead; val_fraction=0: no split at all
    _, val, how = validation_indices("folder", mix.train["folder"].base, {**cfg, "val_splits": ["test"]})
    assert len(val) == 1 and how.startswith("seeded")
    assert validation_indices("folder", mix.train["folder"].base,
                              {**cfg, "val_splits": [], "val_fraction": 0.0})[1] == []


def test_augmented_validation_images_are_served_plain():
    cfg = compose_cfg("train", [*TINY, "data.augment.enabled=true", "data.augment.hflip=1.0"]).data
    mix = build_mix(cfg, validation=True)
    plain = build_mix(compose_cfg("train", TINY).data, validation=True)
    va, ref = mix.val["synth_1"], plain.val["synth_1"]
    for i in range(len(va)):
        assert torch.equal(va[i][0], ref[i][0]) and torch.equal(va[i][1], ref[i][1])


def test_patience_stops_early_and_no_validation_needs_an_explicit_heldout_metric(tmp_path):
    from metaseg.engine.training.best import BestTracker
    from metaseg.engine.training.trainer import stop_early
    t = compose_cfg("train", [*TINY, "trainer.patience=2", "trainer.eval_every=5"]).trainer
    best = BestTracker("val.mean.adapted_miou")
    best.update({"val": {"mean": {"adapted_miou": 0.5}}}, 5)
    assert not stop_early(t, best, 10) and stop_early(t, best, 15)
    with pytest.raises(ConfigError, match="data.val_fraction>0"):
        train(compose_cfg("train", [*TINY, "trainer.device=cpu", "data.val_fraction=0"]), tmp_path / "a")
    with pytest.raises(ConfigError, match="validation datasets .* too few images for eval.shots=3"):
        train(compose_cfg("train", [*TINY, "trainer.device=cpu", "eval.shots=3"]), tmp_path / "b")
