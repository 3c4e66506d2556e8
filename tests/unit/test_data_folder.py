"""The folder source: pairing, label maps, splits and groups, decode-once cache, transforms, full resolution."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

import metaseg.data.pairs as pairs_mod
from metaseg.data import build_mix
from metaseg.data.labels import build_label_map
from metaseg.data.transforms import JointTransform
from metaseg.utils.errors import ConfigError
from metaseg.utils.masks import IGNORE
from tests.helpers import compose_cfg
from tests.helpers import folder_dataset, half_mask


def folder_cfg(root, *overrides):
    cfg = compose_cfg("eval", ["checkpoint=x.pt", "data=folder", f"data.root={root}", "data.size=8",
                               "data.workers=1", *overrides])
    return cfg.data


def test_binary_folder_maps_255_to_1_with_nearest_resize(tmp_path):
    folder_dataset(tmp_path, n=3, h=16, w=20)
    mix = build_mix(folder_cfg(tmp_path), need_train=False)
    assert mix.classes == ["background", "foreground"] and list(mix.heldout) == ["folder"]
    ds = mix.heldout["folder"]
    assert len(ds) == 3
    image, mask = ds[0]
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32
    assert mask.dtype == torch.int64 and mask.shape == (8, 8)
    assert torch.equal(mask[:, :4], torch.ones(8, 4, dtype=torch.long))  # left half was 255
    assert torch.equal(mask[:, 4:], torch.zeros(8, 4, dtype=torch.long))
    # normalised with the mix's mean/std: undoing it gives the resized [0, 1] image
    raw = (image * torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
           + torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1))
    assert 0 <= raw.min() and raw.max() <= 1


def test_full_resolution_is_the_original_size_and_mapping(tmp_path):
    folder_dataset(tmp_path, n=2, h=16, w=20)
    ds = build_mix(folder_cfg(tmp_path), need_train=False).heldout["folder"]
    image, mask = ds.full_resolution(1)
    assert image.shape == (3, 16, 20) and mask.shape == (16, 20)
    assert torch.equal(mask, torch.from_numpy(half_mask(16, 20) // 255).long())
    original = torch.from_numpy(np.array(Image.open(tmp_path / "images" / "img1.png"))).permute(2, 0, 1)
    expect = (original.float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(3, 1, 1)
    assert torch.allclose(image, expect, atol=1e-5)


def test_synthetic_full_resolution_is_its_normal_sample():
    mix = build_mix(compose_cfg("train", ["experiment=smoke"]).data)
    ds = mix.train["synth_0"]
    a, b = ds[3], ds.full_resolution(3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_index_masks_with_value_mapping_and_ignore(tmp_path):
    m = np.zeros((16, 20), dtype=np.uint8)
    m[:, 5:10], m[:, 10:15], m[:, 15:] = 128, 255, 7
    folder_dataset(tmp_path, n=2, masks=[m, m])
    cfg = folder_cfg(tmp_path, "data.num_classes=3", "data.datasets.folder.mask_values={0:0,128:1,255:2}",
                     "data.datasets.folder.ignore_values=[7]")
    mix = build_mix(cfg, need_train=False)
    assert mix.classes == ["background", "class_1", "class_2"]
    _, mask = mix.heldout["folder"].full_resolution(0)
    assert mask[0, :5].eq(0).all() and mask[0, 5:10].eq(1).all() and mask[0, 10:15].eq(2).all()
    assert mask[0, 15:].eq(IGNORE).all()


def test_label_map_by_name_by_id_and_unmapped_to_ignore():
    ds = {"classes": ["bg", "vessel", "optic_disc"], "binary": False, "map": {"bg": "background", 1: "foreground"}}
    lm = build_label_map("d", ds, ["background", "foreground"])
    assert lm.apply(np.array([0, 1, 2, 255])).tolist() == [0, 1, IGNORE, IGNORE]  # disc unmapped, 255 void
    assert lm.undeclared(np.array([0, 1, 2, 255])) == [] and lm.undeclared(np.array([3, 9])) == [3, 9]
    # mapping by name without a map: same names go to the same mix class; 'ignore' drops a class
    lm = build_label_map("d", {"classes": ["Sky", "Road"], "map": {"Sky": "ignore"}, "binary": False},
                         ["Road", "Sky"])
    assert lm.apply(np.array([0, 1])).tolist() == [IGNORE, 0]
    # binary 0/255 masks: 255 -> 1
    lm = build_label_map("d", {"classes": ["background", "polyp"], "map": {"polyp": "foreground"}},
                         ["background", "foreground"])
    assert lm.apply(np.array([0, 255])).tolist() == [0, 1] and lm.undeclared(np.array([0, 1, 255])) == [1]
    with pytest.raises(ConfigError, match=r"data.datasets.d.map\['x'\]: 'nope' is not one of"):
        build_label_map("d", {"classes": ["x", "y"], "map": {"x": "nope"}}, ["a", "b"])
    with pytest.raises(ConfigError, match=r"none of its classes \['x', 'y'\] maps into data.classes"):
        build_label_map("d", {"classes": ["x", "y"]}, ["a", "b"])


def test_splits_groups_and_max_images(tmp_path):
    folder_dataset(tmp_path, n=6, splits=["train", "test"] * 3,
                   groups={"site": ["a", "a", "b", "b", "c", "c"]})
    cfg = folder_cfg(tmp_path, "data.datasets.folder.split=[train]")
    ds = build_mix(cfg, need_train=False).heldout["folder"]
    assert ds.info()["splits"] == {"train": 3} and [p.stem for p in ds.base.pairs] == ["img0", "img2", "img4"]
    cfg = folder_cfg(tmp_path, "data.datasets.folder.groups={site:[b,c]}")
    assert [p.stem for p in build_mix(cfg, need_train=False).heldout["folder"].base.pairs] == [
        "img2", "img3", "img4", "img5"]
    cfg = folder_cfg(tmp_path, "data.max_images=3")  # evenly spaced over the sorted stems
    assert [p.stem for p in build_mix(cfg, need_train=False).heldout["folder"].base.pairs] == [
        "img0", "img2", "img5"]
    with pytest.raises(ConfigError, match=r"groups.csv has no column 'sequence' \(has \['site'\]\)"):
        build_mix(folder_cfg(tmp_path, "data.datasets.folder.groups={sequence:[x]}"), need_train=False)
    with pytest.raises(ConfigError, match=r"split names \['val'\], not in splits.csv \(has \['test', 'train'\]\)"):
        build_mix(folder_cfg(tmp_path, "data.datasets.folder.split=[val]"), need_train=False)


def test_images_are_decoded_once_and_disk_cache_is_reused(tmp_path, monkeypatch):
    root = folder_dataset(tmp_path / "d", n=4, ext=".jpg")
    calls = []
    real = pairs_mod.decode_pair
    monkeypatch.setattr(pairs_mod, "decode_pair", lambda *a, **k: calls.append(a[0].stem) or real(*a, **k))
    cache = tmp_path / "cache"
    cfg = folder_cfg(root, "data.cache=disk", f"data.cache_dir={cache}")
    ds = build_mix(cfg, need_train=False).heldout["folder"]
    assert sorted(calls) == ["img0", "img1", "img2", "img3"]
    first = [ds[i] for i in range(4)]
    for _ in range(3):
        for i in range(4):
            ds[i]
    assert len(calls) == 4  # samples come from memory, never decoded again
    assert len(list(cache.glob("*.npz"))) == 4
    # another build (another run) reads the disk cache: no decoding, identical samples
    calls.clear()
    ds2 = build_mix(cfg, need_train=False).heldout["folder"]
    assert calls == []
    assert all(torch.equal(a[0], ds2[i][0]) and torch.equal(a[1], ds2[i][1]) for i, a in enumerate(first))
    # a changed file misses the cache
    st = os.stat(root / "masks" / "img2.png")
    os.utime(root / "masks" / "img2.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    build_mix(cfg, need_train=False)
    assert calls == ["img2"]


def test_augmentation_keeps_labels_nearest_and_is_seeded():
    aug = compose_cfg("train", ["data=retina_lodo"]).data.augment
    assert aug.enabled
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    mask = torch.zeros(40, 50, dtype=torch.uint8)
    mask[5:20, 10:30], mask[25:, :] = 1, IGNORE
    t1 = JointTransform(16, aug, seed=0, name="a")
    t2 = JointTransform(16, aug, seed=0, name="a")
    outs = [t1(image, mask) for _ in range(6)]
    for (img, msk), (img2, msk2) in zip(outs, [t2(image, mask) for _ in range(6)]):
        assert img.shape == (3, 16, 16) and msk.shape == (16, 16) and msk.dtype == torch.int64
        assert set(msk.unique().tolist()) <= {0, 1, IGNORE}  # nearest: no blended labels, 255 kept
        assert torch.equal(img, img2) and torch.equal(msk, msk2)  # same seed, same crops
    assert len({tuple(m.flatten().tolist()) for _, m in outs}) > 1  # crops differ between draws
    assert any(IGNORE in m for _, m in outs)
    # resize only: deterministic and the whole image
    img, msk = JointTransform(10)(image, mask)
    assert img.shape == (3, 10, 10) and msk[-1].eq(IGNORE).all() and msk[0].eq(0).all()


def test_training_datasets_are_augmented_heldout_ones_are_not(tmp_path):
    for name in ("retina_drive", "retina_stare", "retina_chasedb1"):  # retina_lodo's layout, fake files
        folder_dataset(tmp_path / name, n=4, h=24, w=24)
    cfg = compose_cfg("train", ["data=retina_lodo", f"data.root={tmp_path}", "data.size=8", "data.workers=1",
                                "data.heldout=[retina_stare]"])
    mix = build_mix(cfg.data)
    assert list(mix.train) == ["retina_drive", "retina_chasedb1"] and list(mix.heldout) == ["retina_stare"]
    train, held = mix.train["retina_drive"], mix.heldout["retina_stare"]
    assert train.base.augmented and not held.base.augmented
    assert train.base.images[0].shape[-2:] == (16, 16)  # cached at 2 x size for crops
    assert held.base.images[0].shape[-2:] == (8, 8)  # cached at size: resize-only
    assert torch.equal(held[0][0], held[0][0])
    assert not all(torch.equal(train[0][0], train[0][0]) for _ in range(3))


def test_real_mix_tasks_are_reproducible_and_support_query_disjoint(tmp_path):
    from metaseg.data import TaskSampler

    for name in ("retina_drive", "retina_stare", "retina_chasedb1"):
        folder_dataset(tmp_path / name, n=6, h=24, w=24)
    tasks = []
    for _ in range(2):
        cfg = compose_cfg("train", ["data=retina_lodo", f"data.root={tmp_path}", "data.size=8", "data.workers=2"])
        mix = build_mix(cfg.data)
        sampler = TaskSampler(mix.train, mix.weights, 2, 2, seed=3)
        tasks.append([sampler.sample() for _ in range(4)])
    for t1, t2 in zip(*tasks):
        assert t1.dataset == t2.dataset
        assert torch.equal(t1.support[0], t2.support[0]) and torch.equal(t1.query[1], t2.query[1])
        support = {tuple(x.flatten().tolist()) for x in t1.support[0]}
        assert not support & {tuple(x.flatten().tolist()) for x in t1.query[0]}
