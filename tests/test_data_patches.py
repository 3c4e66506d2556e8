"""``data.patches``: training on patches of images at their working scale, scored whole by sliding window."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from PIL import Image

import metaseg.config  # noqa: F401 - registers the schemas
from metaseg.data.mix import build_mix
from metaseg.data.tasks import TaskSampler
from metaseg.engine.evaluation.protocol import support_batch
from metaseg.engine.training.trainer import train
from metaseg.utils.errors import ConfigError
from tests.data_fixtures import SHARED_DATA, folder_dataset
from tests.conftest import NO_BASELINE


def stripes(h: int, w: int) -> np.ndarray:
    """Vertical 1-pixel lines every 4 columns: thin structure that a resize to 16 px would blur away."""
    m = np.zeros((h, w), dtype=np.uint8)
    m[:, ::4] = 255
    return m


NAMES = {"a": "retina_drive", "b": "retina_stare", "c": "retina_chasedb1"}  # binary_patches' vessel sets


@pytest.fixture()
def root(tmp_path):
    for name, (h, w) in {"a": (40, 48), "b": (36, 60), "c": (50, 50)}.items():
        folder_dataset(tmp_path / NAMES[name], n=8, h=h, w=w, masks=[stripes(h, w)] * 8)
    return tmp_path


def cfg_for(root, *extra):
    """The study's mix (data=binary_patches) on three tiny vessel-like sets in ``root``, 16 px patches."""
    with initialize_config_module(config_module="metaseg.conf", version_base="1.3"):
        return compose("train", ["data=binary_patches", f"data.root={root}", "data.size=16",
                                 f"data.heldout=[{NAMES['c']}]", f"data.train=[{NAMES['a']},{NAMES['b']}]",
                                 NO_BASELINE, *extra])


def test_patches_keep_original_pixels(root):
    cfg = cfg_for(root)
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


def test_dataset_scale_resamples_before_patches(root):
    cfg = cfg_for(root, "data.datasets.retina_chasedb1.scale=0.5")
    held = build_mix(cfg.data, need_train=False).heldout[NAMES["c"]]
    assert held.full_resolution(0)[0].shape == (3, 25, 25)
    cfg = cfg_for(root, "data.datasets.retina_chasedb1.scale=0.1")  # 5 px would not hold a 16 px patch: enlarged just enough
    assert build_mix(cfg.data, need_train=False).heldout[NAMES["c"]].full_resolution(0)[0].shape == (3, 16, 16)


def test_support_patches_are_seeded_crops_of_the_support_images(root):
    cfg = cfg_for(root, "eval.support_patches=3")
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


def test_training_tasks_and_slide_evaluation_end_to_end(root, tmp_path):
    cfg = cfg_for(root, "trainer.max_steps=2", "trainer.eval_every=0", "meta.inner_steps=1", "meta.shots=2",
                  "meta.query=2", "eval.shots=1", "eval.episodes=2", "eval.mode=slide", "eval.support_patches=2",
                  "eval.pictures=0", "trainer.monitor_tasks=0", "data.val_fraction=0.34", "eval.val_episodes=1",
                  "model.extra.decoder_channels=[8,8,8]", "trainer.device=cpu")
    mix = build_mix(cfg.data, validation=True)
    task = TaskSampler(mix.train, mix.weights, 2, 2, 0).sample()
    assert task.support[0].shape == (2, 3, 16, 16)
    train(cfg, tmp_path / "run")
    import json
    result = json.loads((tmp_path / "run" / "metrics.json").read_text())
    held = result["datasets"][NAMES["c"]]
    assert held["window"] == [16, 16] and held["adapted"]["episodes"] == 2
    for name in (NAMES["a"], NAMES["b"]):  # validation images scored whole too, not by a centre patch
        val = result["val"]["datasets"][name]
        assert val["window"] == [16, 16]  # only a sliding-window score records its window


def test_patches_need_slide_scoring_and_files(root, tmp_path):
    assert cfg_for(root).eval.mode == "slide"  # the patch mix brings its evaluation mode (conf/data_eval)
    with pytest.raises(ConfigError, match="eval.mode=slide"):  # and refuses a user's resize
        train(cfg_for(root, "trainer.max_steps=1", "eval.mode=resize"), tmp_path / "x")
    assert not (tmp_path / "x" / "checkpoints").exists()
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


def test_fg_patches_needs_patches_and_a_share(root):
    with pytest.raises(ConfigError, match=r"data.fg_patches=1.5 must be in \[0, 1\]"):
        build_mix(cfg_for(root, "data.fg_patches=1.5").data)
    with initialize_config_module(config_module="metaseg.conf", version_base="1.3"):
        syn = compose("train", ["data.fg_patches=0.5"])
    with pytest.raises(ConfigError, match="data.fg_patches=0.5 places patches, but data.patches=false"):
        build_mix(syn.data)
