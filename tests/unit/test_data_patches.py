"""``data.patches``: training on patches of images at their working scale, scored whole by sliding window.

A run on patches end to end: tests/integration/test_data_patches.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from PIL import Image

import metaseg.config  # noqa: F401 - registers the schemas
from metaseg.data.mix import build_mix
from metaseg.engine.evaluation.protocol import support_batch
from metaseg.engine.training.trainer import validate
from metaseg.utils.errors import ConfigError
from tests.helpers import SHARED_DATA, VESSELS, folder_dataset, stripes
from tests.helpers import patch_cfg as cfg_for

NAMES = VESSELS
# ``vessel_root`` (tests/conftest.py): three tiny vessel-like folder datasets (1-px stripes)


def test_patches_keep_original_pixels(vessel_root):
    cfg = cfg_for(vessel_root)
    mix = build_mix(cfg.data, validation=True)
    ds = mix.train[NAMES["a"]]
    for i in range(4):
        image, mask = ds[i]
        assert image.shape == (3, 16, 16) and mask.shape == (16, 16)
        # a crop (flips allowed) of the 1-px stripes: every 4th column foreground, never blurred or resized
        cols = mask.float().mean(0)
        assert set(cols.unique().tolist()) == {0.0, 1.0} and int(cols.sum()) == 4
    full, fmask = mix.heldout[NAMES["c"]].full_resolution(0)
    assert full.shape == (3, 50, 50) and torch.equal(fmask, torch.from_numpy(stripes(50, 50) // 255).long())


def test_dataset_scale_resamples_before_patches(vessel_root):
    cfg = cfg_for(vessel_root, "data.datasets.retina_chasedb1.scale=0.5")
    held = build_mix(cfg.data, need_train=False).heldout[NAMES["c"]]
    assert held.full_resolution(0)[0].shape == (3, 25, 25)
    cfg = cfg_for(vessel_root, "data.datasets.retina_chasedb1.scale=0.1")  # 5 px would not hold a 16 px patch: enlarged just enough
    assert build_mix(cfg.data, need_train=False).heldout[NAMES["c"]].full_resolution(0)[0].shape == (3, 16, 16)


def test_support_patches_are_seeded_crops_of_the_support_images(vessel_root):
    cfg = cfg_for(vessel_root, "eval.support_patches=3")
    held = build_mix(cfg.data, need_train=False).heldout[NAMES["c"]]
    x, m = support_batch(held, [2, 4], cfg.eval, [0, 1, 2, 5])
    assert x.shape == (6, 3, 16, 16) and m.shape == (6, 16, 16)
    y, _ = support_batch(held, [2, 4], cfg.eval, [0, 1, 2, 5])
    z, _ = support_batch(held, [2, 4], cfg.eval, [0, 1, 3, 5])
    assert torch.equal(x, y) and not torch.equal(x, z)  # same key: same patches; another episode: others
    image, _ = held.full_resolution(2)
    hits = [any(torch.equal(x[j], image[:, t:t + 16, s:s + 16]) for t in range(35) for s in range(35))
            for j in range(3)]
    assert all(hits)  # the first image's patches are windows of support image 2 (normalised alike)


def test_patches_need_slide_scoring_and_files(vessel_root):
    assert cfg_for(vessel_root).eval.mode == "slide"  # the patch mix brings its evaluation mode (conf/data_eval)
    with pytest.raises(ConfigError, match="eval.mode=slide"):  # and refuses a user's resize (before any work)
        validate(cfg_for(vessel_root, "trainer.max_steps=1", "eval.mode=resize"))
    with initialize_config_module(config_module="metaseg.conf", version_base="1.3"):
        syn = compose("train", ["data.patches=true"])
    with pytest.raises(ConfigError, match="data.patches=true cuts patches from images on disk"):
        build_mix(syn.data)


@pytest.mark.skipif(not (SHARED_DATA / "retina_drive").exists(), reason="../shared/data not present")
def test_lodo_mix_serves_vessel_patches_at_full_resolution():
    with initialize_config_module(config_module="metaseg.conf", version_base="1.3"):
        cfg = compose("train", ["experiment=lodo", f"data.root={SHARED_DATA}", "data.heldout=[retina_stare]",
                                "data.train=[retina_drive]"])
    mix = build_mix(cfg.data)
    image, mask = mix.heldout["retina_stare"].full_resolution(0)
    ref = np.array(Image.open(sorted((SHARED_DATA / "retina_stare" / "masks").glob("*.png"))[0]))
    assert mask.shape == ref.shape and torch.equal(mask, torch.from_numpy(ref // 255).long())  # the original mask
    assert mix.train["retina_drive"][0][0].shape == (3, 64, 64)


def blob(h: int, w: int) -> np.ndarray:
    """One 3 x 3 foreground square in a corner: a uniform 16 px patch rarely holds it."""
    m = np.zeros((h, w), dtype=np.uint8)
    m[2:5, w - 5:w - 2] = 255
    return m


def test_patch_place_on_foreground_or_uniform():
    from metaseg.data.transforms import patch_place, random_patch

    mask = torch.from_numpy(blob(60, 70) // 255).long()
    mask[0, 0] = 255  # ignored pixels are not foreground
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        top, left = patch_place(mask, 16, g, 1.0)
        assert 0 <= top <= 44 and 0 <= left <= 54
        assert mask[top:top + 16, left:left + 16].eq(1).any()
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert [patch_place(mask, 16, a, 0.0) for _ in range(5)] == [random_patch(60, 70, 16, b) for _ in range(5)]
    empty = torch.zeros(60, 70, dtype=torch.long)
    assert 0 <= patch_place(empty, 16, g, 1.0)[0] <= 44  # no foreground: a uniform place


def test_fg_patches_put_support_patches_and_training_crops_on_foreground(tmp_path):
    for name in NAMES.values():
        folder_dataset(tmp_path / name, n=8, h=60, w=70, masks=[blob(60, 70)] * 8)

    def fg_share(fg):
        cfg = cfg_for(tmp_path, f"data.fg_patches={fg}", "eval.support_patches=10")
        mix = build_mix(cfg.data, validation=True)
        _, support = support_batch(mix.heldout[NAMES["c"]], [0, 1], cfg.eval, [0, 1, 2, 5])
        crops = [mix.train[NAMES["a"]][i % 5][1] for i in range(20)]
        return support.flatten(1).eq(1).any(1).float().mean(), torch.stack(crops).flatten(1).eq(1).any(1).float().mean()

    assert fg_share(1.0) == (1.0, 1.0)
    uniform = fg_share(0.0)
    assert uniform[0] < 0.5 and uniform[1] < 0.5  # the blob lies in few of the 45 x 55 places


def test_fg_patches_needs_patches_and_a_share(vessel_root):
    with pytest.raises(ConfigError, match=r"data.fg_patches=1.5 must be in \[0, 1\]"):
        build_mix(cfg_for(vessel_root, "data.fg_patches=1.5").data)
    with initialize_config_module(config_module="metaseg.conf", version_base="1.3"):
        syn = compose("train", ["data.fg_patches=0.5"])
    with pytest.raises(ConfigError, match="data.fg_patches=0.5 places patches, but data.patches=false"):
        build_mix(syn.data)
