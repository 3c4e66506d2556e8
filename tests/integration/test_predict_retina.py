"""metaseg-predict on real fundus photographs: adapting on a few labelled STARE patches segments vessels
better than the checkpoint does zero-shot, measured on other STARE images (skipped without ../shared/data).

The checkpoint is a tiny retina_lodo run (two outer steps at 64 px on DRIVE and CHASE_DB1),
so zero-shot it knows next to nothing about STARE's vessels. The support is a few 64 x 64
patches cut at native resolution from three STARE images, where vessels are several pixels
wide (a user labels patches with vessels in them: at least 12% vessel pixels); held-out
patches come the same way from six other STARE images. Each run's masks are read back from
``out/masks`` and scored against the STARE masks here, with numpy. The slow test does the
same on whole held-out images at their original 700 x 605 pixels, with the sliding window.
"""

import numpy as np
import pytest
from PIL import Image

from metaseg.engine.prediction.segment import segment_folder
from metaseg.engine.training.trainer import train
from tests.helpers import SHARED_DATA, compose_cfg

STARE = SHARED_DATA / "retina_stare"
# slow: 40 adaptation steps on real patches, after training the checkpoint (~15 s on two idle cores);
# adaptation, prediction and their files are in the default suite (tests/unit/test_predict.py,
# tests/integration/test_predict.py)
pytestmark = [pytest.mark.skipif(not (SHARED_DATA / "retina_drive").is_dir() or not STARE.is_dir(),
                                 reason=f"real datasets not found at {SHARED_DATA}"), pytest.mark.slow]
PATCH = 64
ADAPT = ["adapt.steps=40", "adapt.lr=0.3"]


@pytest.fixture(scope="module")
def lodo_checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("lodo")
    cfg = compose_cfg("train", [
        "data=retina_lodo", f"data.root={SHARED_DATA}", "data.max_images=6", "data.val_fraction=0.2",  # 5 training images
        f"data.size={PATCH}", "data.workers=2",
        "meta.shots=2", "meta.query=2", "meta.inner_steps=1", "meta.meta_batch=2", "trainer.max_steps=2",
        "trainer.eval_every=0", "trainer.device=cpu", "eval.episodes=0", "trainer.best_metric=mean.zero_shot_miou",
        "model.extra.decoder_channels=[16,8,8]"])
    train(cfg, run)
    return run / "checkpoints" / "last.pt"


def stare_stems() -> list[str]:
    return sorted(p.stem for p in (STARE / "images").iterdir())


def vessel_patches(root, stems, per_image, seed, min_vessel=0.12):
    """``root/images`` + ``root/masks``: native-resolution patches holding at least ``min_vessel`` vessel pixels."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for stem in stems:
        image = np.array(Image.open(STARE / "images" / f"{stem}.png").convert("RGB"))
        mask = np.array(Image.open(STARE / "masks" / f"{stem}.png"))
        h, w = mask.shape
        kept = 0
        while kept < per_image:
            y, x = int(rng.integers(0, h - PATCH)), int(rng.integers(0, w - PATCH))
            crop = mask[y : y + PATCH, x : x + PATCH]
            if (crop > 127).mean() < min_vessel:
                continue
            Image.fromarray(image[y : y + PATCH, x : x + PATCH]).save(root / "images" / f"{stem}_{kept}.png")
            Image.fromarray(crop).save(root / "masks" / f"{stem}_{kept}.png")
            kept += 1
    return root


def vessel_dice(out, truth_dir) -> float:
    """Dice of the vessel class over all written masks against the ground truth (one confusion count)."""
    tp = fp = fn = 0
    for truth_path in sorted(truth_dir.iterdir()):
        truth = np.array(Image.open(truth_path)) > 127
        pred = np.array(Image.open(out / "masks" / truth_path.name)) == 1
        assert pred.shape == truth.shape
        tp += int((pred & truth).sum())
        fp += int((pred & ~truth).sum())
        fn += int((~pred & truth).sum())
    return 2 * tp / (2 * tp + fp + fn)


def predict(checkpoint, images, out, *overrides):
    return segment_folder(compose_cfg("predict", [f"checkpoint={checkpoint}", f"images={images}", f"out={out}",
                                                  "device=cpu", "workers=2", "overlays=false", *overrides]))


def test_adapting_on_a_few_labelled_patches_segments_vessels_better_than_zero_shot(tmp_path, lodo_checkpoint):
    stems = stare_stems()
    support = vessel_patches(tmp_path / "support", stems[:3], per_image=3, seed=0)
    heldout = vessel_patches(tmp_path / "heldout", stems[10:16], per_image=2, seed=1)
    zero = predict(lodo_checkpoint, heldout / "images", tmp_path / "zero")
    adapted = predict(lodo_checkpoint, heldout / "images", tmp_path / "adapted", f"support={support}", *ADAPT)
    assert zero["support"] is None and adapted["support"]["images"] == 9
    assert adapted["head"]["kind"] == "checkpoint"  # both binary: the checkpoint's own head adapts
    dice_zero = vessel_dice(tmp_path / "zero", heldout / "masks")
    dice_adapted = vessel_dice(tmp_path / "adapted", heldout / "masks")
    print(f"STARE held-out patches, vessel Dice: zero-shot {dice_zero:.3f}, adapted on 9 patches {dice_adapted:.3f}")
    assert dice_adapted > dice_zero + 0.1


def test_adapted_model_segments_whole_held_out_images_at_full_resolution(tmp_path, lodo_checkpoint):
    stems = stare_stems()
    support = vessel_patches(tmp_path / "support", stems[:3], per_image=3, seed=0)
    images, truth = tmp_path / "images", tmp_path / "truth"
    images.mkdir()
    truth.mkdir()
    for stem in stems[10:14]:
        (images / f"{stem}.png").symlink_to(STARE / "images" / f"{stem}.png")
        (truth / f"{stem}.png").symlink_to(STARE / "masks" / f"{stem}.png")
    zero = predict(lodo_checkpoint, images, tmp_path / "zero", "mode=slide", "batch_size=32")
    adapted = predict(lodo_checkpoint, images, tmp_path / "adapted", "mode=slide", "batch_size=32",
                      f"support={support}", *ADAPT)
    assert all(f["size"] == [700, 605] for f in adapted["files"].values()) and zero["written"] == 4
    dice_zero = vessel_dice(tmp_path / "zero", truth)
    dice_adapted = vessel_dice(tmp_path / "adapted", truth)
    print(f"STARE whole held-out images (slide), vessel Dice: zero-shot {dice_zero:.3f}, adapted {dice_adapted:.3f}")
    assert dice_adapted > dice_zero + 0.1
