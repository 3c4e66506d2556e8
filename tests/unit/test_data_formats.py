"""VOC, Cityscapes and FSS-1000 layouts (tiny fakes in tmp_path), and binary_class tasks."""

import numpy as np
import pytest
import torch
from PIL import Image

from metaseg.data import TaskSampler, build_mix
from metaseg.data.cityscapes import LABEL_TO_TRAIN
from metaseg.utils.errors import ConfigError, DataError
from metaseg.utils.masks import IGNORE
from tests.helpers import compose_cfg
from tests.helpers import half_mask, rgb


def palette_png(path, index: np.ndarray):
    im = Image.fromarray(index.astype(np.uint8), mode="P")
    im.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)])
    im.save(path)


def fake_voc(root, ids_by_split):
    base = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True)
    for split, ids in ids_by_split.items():
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for k, i in enumerate(ids):
            rgb(12, 16, k).save(base / "JPEGImages" / f"{i}.jpg")
            m = np.zeros((12, 16), dtype=np.uint8)
            m[:, :8] = 15 if k % 2 == 0 else 12  # person or dog
            m[0, :] = 255  # void border
            palette_png(base / "SegmentationClass" / f"{i}.png", m)
    return root / "VOCdevkit"


def voc_cfg(root, *overrides):
    return compose_cfg("train", ["data=voc", f"data.root={root}", "data.size=8", "data.workers=1", *overrides]).data


def test_voc_palette_masks_splits_and_void(tmp_path):
    root = fake_voc(tmp_path, {"train": ["2007_000001", "2007_000002", "2007_000003"], "val": ["2008_000001"]})
    mix = build_mix(voc_cfg(root))
    assert list(mix.train) == ["voc_train"] and len(mix.train["voc_train"]) == 3 and len(mix.heldout["voc_val"]) == 1
    assert mix.classes[15] == "person" and mix.num_classes == 21
    _, mask = mix.heldout["voc_val"].full_resolution(0)
    assert mask[0].eq(IGNORE).all() and mask[1:, :8].eq(15).all() and mask[1:, 8:].eq(0).all()


def test_voc_rgb_masks_are_refused(tmp_path):
    root = fake_voc(tmp_path, {"train": ["a", "b"], "val": ["c"]})
    Image.fromarray(np.stack([half_mask(12, 16)] * 3, -1)).save(root / "VOC2012" / "SegmentationClass" / "c.png")
    with pytest.raises(DataError, match=r"dataset 'voc_val' .*colour \(RGB\) masks.*: c.png \(mode RGB\)"):
        build_mix(voc_cfg(root))


def test_cityscapes_label_ids_map_to_train_ids_and_cities_select(tmp_path):
    for split, city in (("train", "aachen"), ("train", "bremen"), ("val", "lindau")):
        for sub in ("leftImg8bit", "gtFine"):
            (tmp_path / sub / split / city).mkdir(parents=True)
        for k in range(2):
            stem = f"{city}_000000_00001{k}"
            rgb(8, 16, k).save(tmp_path / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            ids = np.tile(np.arange(16, dtype=np.uint8) + 18, (8, 1))  # label ids 18..33
            Image.fromarray(ids).save(tmp_path / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
    cfg = compose_cfg("train", ["data=cityscapes", f"data.root={tmp_path}", "data.size=8", "data.workers=1",
                                "data.datasets.cityscapes_train.folders=[bremen]"]).data
    mix = build_mix(cfg)
    assert len(mix.train["cityscapes_train"]) == 2 and len(mix.heldout["cityscapes_val"]) == 2
    assert all("bremen" in p.stem for p in mix.train["cityscapes_train"].base.pairs)
    _, mask = mix.heldout["cityscapes_val"].full_resolution(0)
    expect = [LABEL_TO_TRAIN.get(i, IGNORE) for i in range(18, 34)]
    assert mask[0].tolist() == expect  # e.g. 26 (car) -> 13, 18 (polegroup) -> ignore
    assert mix.classes[13] == "car"


def fake_fss(root, classes=("abacus", "zebra", "yacht"), n=4):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(1, n + 1):
            rgb(12, 12, 10 * c + i).save(root / name / f"{i}.jpg")
            m = np.zeros((12, 12, 3), dtype=np.uint8)  # FSS masks may be RGB and anti-aliased
            m[2:9, 2:9] = 250
            m[9, 2:9] = 100
            Image.fromarray(m).save(root / name / f"{i}.png")
    (root / "train.txt").write_text("abacus\nzebra\n")
    (root / "test.txt").write_text("yacht\n")
    return root


def test_fss_class_folders_are_binary_tasks(tmp_path):
    root = fake_fss(tmp_path)
    cfg = compose_cfg("train", ["data=fss", f"data.root={root}", "data.size=12", "data.workers=1",
                                "meta.shots=2", "meta.query=2"])
    mix = build_mix(cfg.data)
    assert list(mix.train) == ["fss_train/abacus", "fss_train/zebra"] and list(mix.heldout) == ["fss_test/yacht"]
    assert mix.weights == [0.5, 0.5] and mix.parents["fss_train/zebra"] == "fss_train"
    _, mask = mix.heldout["fss_test/yacht"].full_resolution(2)
    assert mask[2:9, 2:9].eq(1).all() and mask[9].eq(0).all() and mask.sum() == 49  # thresholded at 128
    sampler = TaskSampler(mix.train, mix.weights, 2, 2, seed=0)
    task = sampler.sample()
    assert task.dataset in mix.train and task.support[0].shape == (2, 3, 12, 12)


def test_fss_unknown_class_folder(tmp_path):
    root = fake_fss(tmp_path)
    cfg = compose_cfg("train", ["data=fss", f"data.root={root}", "data.size=12",
                                "data.datasets.fss_test.folders=[yacht,unicorn]"])
    with pytest.raises(ConfigError, match=r"data.datasets.fss_test.folders names 1 class folder\(s\) not in .*: unicorn"):
        build_mix(cfg.data)


def test_binary_class_tasks_from_the_synthetic_mix():
    cfg = compose_cfg("train", ["experiment=smoke", "data.task=binary_class"])
    mix = build_mix(cfg.data)
    assert mix.classes == ["background", "foreground"] and mix.task == "binary_class"
    assert list(mix.train)[:3] == ["synth_0/disk", "synth_0/square", "synth_0/triangle"]
    assert len(mix.train) == 12 and len(mix.heldout) == 6
    assert sum(mix.weights) == pytest.approx(4.0)  # each dataset's weight split over its classes
    base = build_mix(compose_cfg("train", ["experiment=smoke"]).data).train["synth_0"]
    view = mix.train["synth_0/square"]
    for i in range(len(view)):
        image, mask = view[i]
        b_image, b_mask = base[view.indices[i]]
        assert torch.equal(image, b_image)
        assert torch.equal(mask, (b_mask == 2).long())  # square vs the rest
        assert mask.sum() > 0  # only images that hold the class
    with_squares = sum(int((base[j][1] == 2).any()) for j in range(len(base)))
    assert len(view) == with_squares
    s1 = TaskSampler(mix.train, mix.weights, 2, 2, seed=5)
    s2 = TaskSampler(mix.train, mix.weights, 2, 2, seed=5)
    for _ in range(4):
        t1, t2 = s1.sample(), s2.sample()
        assert t1.dataset == t2.dataset and torch.equal(t1.support[1], t2.support[1])
        assert set(t1.support[1].unique().tolist()) <= {0, 1}


def test_binary_class_limits_and_unknown_task():
    cfg = compose_cfg("train", ["experiment=smoke", "data.task=binary_class", "data.binary_classes=[disk]"])
    assert [n.split("/")[1] for n in build_mix(cfg.data).train] == ["disk"] * 4
    with pytest.raises(ConfigError, match=r"data.binary_classes names \['hexagon'\], not in data.classes"):
        build_mix(compose_cfg("train", ["experiment=smoke", "data.task=binary_class",
                                        "data.binary_classes=[hexagon]"]).data)
    with pytest.raises(ConfigError, match=r"data.task='instance' is not one of semantic, binary_class"):
        build_mix(compose_cfg("train", ["experiment=smoke", "data.task=instance"]).data)
