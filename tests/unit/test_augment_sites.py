"""The imaging-site augmentations of ``data.augment`` (zoom, gamma, blur, hue, grayscale, noise).

A model trained on two fundus-photograph sites is tested on a third camera; each option must
change what it models and nothing else, draw only from the transform's seeded generator, and
leave a config without it bit-for-bit where it was. Tiny synthetic tensors, no files.
"""

import pytest
import torch
from omegaconf import OmegaConf

from metaseg.config import AugmentConfig
from metaseg.data.transforms import JointTransform, check_augment
from metaseg.utils.errors import ConfigError
from tests.helpers import compose_cfg

OLD_KEYS = {"enabled": True, "scale": [0.5, 1.0], "ratio": [0.75, 1.3333], "hflip": 0.5, "vflip": 0.5, "jitter": 0.2}
ALL_ON = {"zoom": [0.6, 1.8], "gamma": [0.6, 1.6], "blur": 0.5, "blur_sigma": [0.3, 1.5], "hue": 0.1,
          "grayscale": 0.3, "noise": 0.05}


def aug(**kw):
    """A structured ``data.augment`` (every key, new ones at their defaults unless given)."""
    return OmegaConf.structured(AugmentConfig(**{**OLD_KEYS, **kw}))


def sample(seed=0):
    """A random uint8 image and a sparse 0/1 mask with some ignored pixels."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8, generator=g)
    mask = (torch.rand(40, 48, generator=g) > 0.9).long()
    mask[:2] = 255
    return image, mask


def outputs(t, n=6):
    image, mask = sample()
    return [t(image, mask) for _ in range(n)]


def with_and_without(patch=True, **kw):
    """``((image, mask) with the site options kw, (image, mask) without)`` for a few seeds: a fresh
    pair of transforms per seed, whose first call draws the same geometry (the site options draw
    after it, so later calls of the two would drift apart)."""
    image, mask = sample()
    for seed in range(4):
        opts = dict(seed=seed, name="site", patch=patch, fg_fraction=0.5 if patch else 0.0)
        on = JointTransform(16, aug(hflip=0.5, vflip=0.5, jitter=0.0, **kw), **opts)
        off = JointTransform(16, aug(hflip=0.5, vflip=0.5, jitter=0.0), **opts)
        yield on(image, mask), off(image, mask)


@pytest.mark.parametrize("patch", [True, False])
def test_options_off_reproduce_a_config_without_the_new_keys(patch):
    old = OmegaConf.create(OLD_KEYS)
    off = aug(zoom=None, gamma=None, blur=0.0, hue=0.0, grayscale=0.0, noise=0.0)
    opts = dict(seed=3, name="a", patch=patch, fg_fraction=0.5 if patch else 0.0)
    for new in (aug(), off):
        before, after = outputs(JointTransform(16, old, **opts)), outputs(JointTransform(16, new, **opts))
        for (i0, m0), (i1, m1) in zip(before, after):
            assert torch.equal(i0, i1) and torch.equal(m0, m1)


# The masks the transform gave before the site options existed (seed 3, 8 calls): crop places,
# flips and the jitter draws between them. An option that is off and still drew from the
# generator would shift every later crop and change these.
OLD_MASKS = {True: (6625094, [33, 31, 36, 29, 19, 22, 30, 33]), False: (20016653, [18, 25, 33, 30, 24, 32, 23, 23])}


@pytest.mark.parametrize("patch", [True, False])
def test_options_off_draw_nothing(patch):
    t = JointTransform(16, aug(), seed=3, name="a", patch=patch, fg_fraction=0.5 if patch else 0.0)
    masks = [m for _, m in outputs(t, 8)]
    flat = torch.stack(masks).flatten()
    checksum = int((flat * torch.arange(flat.numel()) % 1000003).sum())
    assert (checksum, [int(m.eq(1).sum()) for m in masks]) == OLD_MASKS[patch]


@pytest.mark.parametrize("patch", [True, False])
def test_same_seed_same_output_with_every_option_on(patch):
    kw = dict(ALL_ON) if patch else {k: v for k, v in ALL_ON.items() if k != "zoom"}
    a, b, other = (JointTransform(16, aug(**kw), seed=s, name="a", patch=patch) for s in (1, 1, 2))
    got, again, elsewhere = outputs(a), outputs(b), outputs(other)
    for (i0, m0), (i1, m1) in zip(got, again):
        assert torch.equal(i0, i1) and torch.equal(m0, m1)
        assert i0.shape == (3, 16, 16) and i0.dtype == torch.float32 and 0 <= i0.min() and i0.max() <= 1
        assert m0.shape == (16, 16) and m0.dtype == torch.int64 and set(m0.unique().tolist()) <= {0, 1, 255}
    assert any(not torch.equal(i0, i2) for (i0, _), (i2, _) in zip(got, elsewhere))


def stripe_width(zoom, width, image_side):
    """Columns of the output patch holding a vertical foreground stripe ``width`` px wide."""
    mask = torch.zeros(image_side, image_side, dtype=torch.long)
    left = image_side // 2 - width // 2
    mask[:, left:left + width] = 1
    image = torch.zeros(3, image_side, image_side, dtype=torch.uint8)
    a = aug(hflip=0.0, vflip=0.0, jitter=0.0, zoom=zoom)
    t = JointTransform(16, a, seed=0, name="z", patch=True, fg_fraction=1.0)
    return {int(t(image, mask)[1].any(0).sum()) for _ in range(5)}


def test_zoom_widens_or_narrows_thin_structures():
    assert stripe_width(None, 1, 32) == {1}
    assert stripe_width([2.0, 2.0], 1, 32) == {2}  # an 8-px square, shown at 16 px, on the stripe (fg placement)
    assert stripe_width(None, 4, 16) == {4}
    assert stripe_width([0.5, 0.5], 4, 32) == {2}  # a 32-px square shown at 16 px
    assert stripe_width([0.1, 0.1], 4, 32) == {2}  # the 160-px square clamped to the 32-px image


def test_gamma_is_monotonic_on_the_image_and_leaves_the_mask():
    for patch in (True, False):
        for (i, m), (i0, m0) in with_and_without(patch, gamma=[2.0, 2.0]):
            assert torch.equal(m, m0)
            assert torch.allclose(i, i0 ** 2, atol=1e-6)
        for (i, m), (i0, m0) in with_and_without(patch, gamma=[0.5, 2.0]):
            order = i0.flatten().argsort()
            assert torch.equal(m, m0) and (i.flatten()[order].diff() >= -1e-6).all()


def high_frequency(image):
    return float(image.diff(dim=-1).pow(2).sum() + image.diff(dim=-2).pow(2).sum())


def test_blur_removes_high_frequencies_only_from_the_image():
    for (i, m), (i0, m0) in with_and_without(blur=1.0, blur_sigma=[1.0, 1.0]):
        assert torch.equal(m, m0)
        assert high_frequency(i) < 0.5 * high_frequency(i0)
        assert abs(float(i.mean() - i0.mean())) < 0.02


def test_blur_probability_zero_never_blurs():
    for (i, m), (i0, m0) in with_and_without(blur=0.0, blur_sigma=[1.0, 2.0]):
        assert torch.equal(i, i0) and torch.equal(m, m0)


def test_grayscale_gives_equal_channels():
    for (i, m), (i0, m0) in with_and_without(patch=False, grayscale=1.0):
        assert torch.equal(m, m0) and not torch.equal(i, i0)
        assert torch.equal(i[0], i[1]) and torch.equal(i[1], i[2])


def test_hue_rotates_colour_keeping_brightness_and_grey():
    for (i, m), (i0, m0) in with_and_without(hue=0.5):
        assert torch.equal(m, m0) and not torch.allclose(i, i0, atol=1e-3)
        assert torch.allclose(i.amax(0), i0.amax(0), atol=1e-5)  # HSV value is kept
    grey, t = torch.full((3, 20, 20), 0.4), JointTransform(16, aug(jitter=0.0, hue=0.5), patch=True)
    assert torch.allclose(t(grey, torch.zeros(20, 20, dtype=torch.long))[0], grey[:, :16, :16], atol=1e-5)


def test_noise_is_small_zero_mean_and_clamped():
    for (i, m), (i0, m0) in with_and_without(noise=0.1):
        assert torch.equal(m, m0) and not torch.equal(i, i0)
        assert 0 <= i.min() and i.max() <= 1
        inside = (i0 > 0.3) & (i0 < 0.7)  # away from the clamp
        diff = (i - i0)[inside]
        assert abs(float(diff.mean())) < 0.02 and float(diff.std()) <= 0.1 * 1.2


@pytest.mark.parametrize("key,value", [
    ("gamma", [2.0, 1.0]), ("gamma", [0.0, 1.0]), ("gamma", [1.0]), ("zoom", [1.5, 0.5]), ("zoom", [-1.0, 2.0]),
    ("blur", 1.5), ("blur_sigma", [0.0, 1.0]), ("blur_sigma", [2.0, 1.0]), ("hue", 0.6), ("hue", -0.1),
    ("grayscale", -0.1), ("noise", -0.1), ("noise", 2.0),
])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"data\.augment\.{key}=") as err:
        check_augment(aug(**{"blur": 0.5, key: value}), patch=True)
    assert "\n" not in str(err.value)


def test_blur_needs_a_sigma_range():
    a = OmegaConf.create({**OLD_KEYS, "blur": 0.5, "blur_sigma": None})
    with pytest.raises(ConfigError, match=r"data\.augment\.blur_sigma="):
        check_augment(a, patch=True)


def test_zoom_is_for_patches_only():
    with pytest.raises(ConfigError, match=r"data\.augment\.zoom=.*data\.augment\.zoom=null"):
        JointTransform(16, aug(zoom=[0.5, 2.0]), patch=False)
    JointTransform(16, aug(zoom=[0.5, 2.0]), patch=True)


def test_held_out_data_are_never_augmented():
    """Without augmentation the site options are not even read: resize or centre patch only."""
    a = aug(enabled=False, **ALL_ON)
    image, mask = sample()
    for patch in (True, False):
        out, plain = JointTransform(16, a, patch=patch)(image, mask), JointTransform(16, patch=patch)(image, mask)
        assert torch.equal(out[0], plain[0]) and torch.equal(out[1], plain[1])


def test_command_line_keys_compose_into_a_working_transform():
    overrides = ["data=binary_patches", *(f"data.augment.{k}={v}".replace(" ", "") for k, v in ALL_ON.items())]
    cfg = compose_cfg("train", overrides)
    t = JointTransform(16, cfg.data.augment, name="a", patch=bool(cfg.data.patches), fg_fraction=0.5)
    image, mask = t(*sample())
    assert image.shape == (3, 16, 16) and mask.shape == (16, 16)
