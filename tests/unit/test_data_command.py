"""``metaseg-data``'s engine in-process: the summary's numbers, the grid, the task-size check."""

import json

import numpy as np
import pytest
from PIL import Image

from metaseg.data.check import inspect_data
from metaseg.utils.errors import DataError
from tests.helpers import compose_cfg
from tests.helpers import folder_dataset


def data_cmd(root, *overrides):
    return compose_cfg("data_cmd", ["data=folder", f"data.root={root}", "data.workers=1", *overrides])


def test_summary_counts_splits_sizes_and_pixel_shares(tmp_path, capsys):
    masks = []
    for i in range(4):
        m = np.zeros((16, 20), dtype=np.uint8)
        m[:, : 5 * (i + 1)] = 255  # foreground share 1/4, 2/4, 3/4, 4/4
        masks.append(m)
    folder_dataset(tmp_path / "d", n=4, masks=masks, splits=["train", "train", "test", "test"])
    summary = inspect_data(data_cmd(tmp_path / "d", "data.size=20", "samples=3"), tmp_path / "run")
    d = summary["datasets"]["folder"]
    assert d["role"] == "heldout" and d["images"] == 4 and d["splits"] == {"train": 2, "test": 2}
    assert d["size_min"] == d["size_max"] == [20, 16]
    # independent: mean foreground share over the four masks, resized 20x16 -> 20x20 (nearest keeps columns)
    assert d["pixels"]["foreground"] == pytest.approx(np.mean([0.25, 0.5, 0.75, 1.0]))
    assert d["pixels"]["background"] + d["pixels"]["foreground"] == pytest.approx(1.0)
    assert summary["size"] == 20
    printed = capsys.readouterr().out
    assert "folder" in printed and "heldout" in printed and "train 2, test 2" in printed
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["datasets"]["folder"]["images"] == 4
    grid = np.array(Image.open(tmp_path / "run" / "samples.png"))
    assert grid.shape == (130 + 2, 3 * 130 + 2, 3)


def test_size_zero_means_64_here(tmp_path):
    folder_dataset(tmp_path / "d", n=2)
    assert inspect_data(data_cmd(tmp_path / "d"), tmp_path / "run")["size"] == 64


def test_task_images_check(tmp_path):
    folder_dataset(tmp_path / "d", n=3)
    with pytest.raises(DataError, match=r"1 dataset\(s\) have fewer images than task_images=8 \(shots \+ query\): "
                                        r"\{'folder': 3\}"):
        inspect_data(data_cmd(tmp_path / "d", "task_images=8"), tmp_path / "run")
    assert not (tmp_path / "run" / "summary.json").exists()
