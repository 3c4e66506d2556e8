"""Bad data stops before training with one line naming the dataset, the file(s) and the fix.

Each case is created in ``tmp_path``; one also runs through ``metaseg-data``'s task to check its
``prog: error: ...`` line and exit status 2: tests/unit/test_commands.py.
"""

import re

import numpy as np
import pytest
from PIL import Image

from metaseg.data import TaskSampler, build_mix
from metaseg.utils.errors import ConfigError, DataError, MetasegError
from tests.helpers import compose_cfg, folder_dataset, half_mask, rgb


def build(root, *overrides):
    cfg = compose_cfg("eval", ["checkpoint=x.pt", "data=folder", f"data.root={root}", "data.size=8",
                               "data.workers=1", *overrides])
    return build_mix(cfg.data, need_train=False)


def message(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text  # one line
    return text


def test_root_missing(tmp_path):
    with pytest.raises(DataError) as e:
        build(tmp_path / "nope")
    assert re.search(r"dataset 'folder': root .*nope does not exist; set data.root", message(e))


def test_root_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as e:
        build(tmp_path / "empty")
    assert re.search(r"dataset 'folder': root .*empty is empty; put images/ and masks/ there", message(e))


def test_root_unset_for_folder(tmp_path):
    cfg = compose_cfg("eval", ["checkpoint=x.pt", "data=folder", "data.size=8"])
    with pytest.raises(ConfigError, match=r"data.root is not set: give the folder the data lives in, data.root=DIR"):
        build_mix(cfg.data, need_train=False)


def test_image_without_mask(tmp_path):
    folder_dataset(tmp_path, n=5)
    for i in (1, 3):
        (tmp_path / "masks" / f"img{i}.png").unlink()
    with pytest.raises(DataError) as e:
        build(tmp_path)
    assert re.search(r"dataset 'folder': 2 image\(s\) have no mask in .*masks: img1.png, img3.png; "
                     r"add masks/<stem>.png or remove the images", message(e))


def test_mask_without_image(tmp_path):
    folder_dataset(tmp_path, n=3)
    Image.fromarray(half_mask(16, 20)).save(tmp_path / "masks" / "stray.png")
    with pytest.raises(DataError) as e:
        build(tmp_path)
    assert re.search(r"dataset 'folder': 1 mask\(s\) have no image in .*images: stray.png; add the images or "
                     r"remove the masks", message(e))


def test_image_and_mask_sizes_differ(tmp_path):
    folder_dataset(tmp_path, n=3)
    Image.fromarray(half_mask(8, 10)).save(tmp_path / "masks" / "img2.png")
    with pytest.raises(DataError) as e:
        build(tmp_path)
    assert ("dataset 'folder'" in message(e) and "1 file(s) have image and mask of different sizes: "
            "img2 (image 20x16, mask 10x8); each mask must have its image's width and height" in message(e))


def test_mask_values_outside_the_declared_mapping(tmp_path):
    bad = half_mask(16, 20)
    bad[0, 0], bad[1, 1] = 1, 128  # e.g. a 0/1 mask pixel and an anti-aliased edge
    folder_dataset(tmp_path, n=4, masks=[half_mask(16, 20), bad, half_mask(16, 20), bad])
    with pytest.raises(DataError) as e:
        build(tmp_path)
    text = message(e)
    assert "dataset 'folder'" in text
    assert ("2 file(s) hold mask values outside the declared mapping {0, 255}: img1.png (values 1, 128), "
            "img3.png (values 1, 128)") in text
    assert "declare the values (data.datasets.folder.mask_values, data.datasets.folder.ignore_values" in text


def test_rgb_mask_where_index_mask_is_declared(tmp_path):
    folder_dataset(tmp_path, n=3)
    Image.fromarray(np.stack([half_mask(16, 20)] * 3, -1)).save(tmp_path / "masks" / "img0.png")
    with pytest.raises(DataError) as e:
        build(tmp_path, "data.num_classes=3")
    assert ("1 file(s) are colour (RGB) masks, but class-index masks are declared: img0.png (mode RGB); "
            "save masks as single-channel PNGs of class indices") in message(e)


def test_unreadable_file(tmp_path):
    folder_dataset(tmp_path, n=3)
    (tmp_path / "images" / "img1.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError) as e:
        build(tmp_path)
    assert re.search(r"dataset 'folder' \(.*\): 1 file\(s\) cannot be read \(unreadable or truncated\): img1.png "
                     r"\(.*\); replace or remove these files", message(e))


def test_truncated_file(tmp_path):
    folder_dataset(tmp_path, n=3, h=64, w=64, ext=".jpg")
    rgb(64, 64, 0).save(tmp_path / "images" / "img2.jpg", quality=95)
    data = (tmp_path / "images" / "img2.jpg").read_bytes()
    (tmp_path / "images" / "img2.jpg").write_bytes(data[: len(data) // 2])  # header intact, pixels cut
    with pytest.raises(DataError) as e:
        build(tmp_path)
    assert re.search(r"1 file\(s\) cannot be read \(unreadable or truncated\): img2.jpg \(.*truncated.*\)",
                     message(e))


def test_fewer_images_than_shots_plus_query(tmp_path):
    folder_dataset(tmp_path, n=3)
    cfg = compose_cfg("train", ["data=folder", f"data.root={tmp_path}", "data.size=8", "data.train=[folder]",
                                "data.heldout=[]", "meta.shots=2", "meta.query=2"])
    mix = build_mix(cfg.data)
    with pytest.raises(ConfigError) as e:
        TaskSampler(mix.train, mix.weights, cfg.meta.shots, cfg.meta.query, seed=0)
    assert "{'folder': 3} have fewer images than meta.shots + meta.query = 4; lower meta.shots" in message(e)


def test_heldout_dataset_also_listed_for_training():
    cfg = compose_cfg("train", ["data=retina_lodo", "data.train=[retina_drive,retina_stare]"])
    with pytest.raises(ConfigError) as e:
        build_mix(cfg.data)
    assert ("['retina_drive'] listed in both data.train and data.heldout: a held-out dataset must not be "
            "meta-trained on; remove it from one of them") in message(e)


def test_all_bad_data_errors_are_metaseg_errors():
    assert issubclass(DataError, MetasegError) and issubclass(ConfigError, MetasegError)
