"""metaseg-predict as a user types it: on the shared trained run's checkpoint (4 classes) with a
small binary support folder, what it writes. Its engine in detail: tests/unit/test_predict.py;
a user error on one line: tests/unit/test_commands.py."""

import json

import numpy as np
import pytest
from PIL import Image

from metaseg.engine.prediction.files import LEGEND_MIN_WIDTH
from tests.helpers import folder_dataset, image_folder, run_cli

SIZES = {"a": (20, 16), "b": (47, 33), "c": (32, 32)}  # stem -> (W, H): helpers.image_folder's


def test_command_writes_one_mask_and_overlay_per_readable_image(tmp_path, trained):
    support = folder_dataset(tmp_path / "support", n=4, h=24, w=24)
    images = image_folder(tmp_path / "images")
    out = tmp_path / "out"
    proc = run_cli("metaseg-predict", f"checkpoint={trained.last}", f"support={support}", f"images={images}",
                   f"out={out}", "device=cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["a.png", "b.png", "c.png"]
    for stem, (w, h) in SIZES.items():
        mask = Image.open(out / "masks" / f"{stem}.png")
        assert mask.size == (w, h) and mask.mode == "P"
        assert set(np.unique(np.array(mask))) <= {0, 1}
        over = Image.open(out / "overlays" / f"{stem}.png")
        assert over.size[0] == max(w, LEGEND_MIN_WIDTH) and over.size[1] > h
    result = json.loads((out / "predict.json").read_text())
    assert result["written"] == 3 and result["images"] == 4
    assert [s["file"] for s in result["skipped"]] == ["broken.png"]
    assert result["classes"] == ["background", "foreground"] and result["head"]["kind"] == "new"
    sup = result["support"]
    assert sup["images"] == 4 and sup["stems"] == ["img0", "img1", "img2", "img3"]
    assert sup["steps"] == 1  # the checkpoint's K
    assert sup["support_loss_after"] < sup["support_loss_before"]  # the new head starts at log 2, then adapts
    assert result["files"]["b"]["size"] == [47, 33] and sum(result["files"]["b"]["share"]) == pytest.approx(1)
    # the unreadable file is named at the end, in the log the user sees and in the run's own log
    log = (out / "predict.log").read_text()
    assert "skipped 1 image(s) that could not be read: broken.png" in log
    assert "broken.png" in proc.stdout + proc.stderr
    assert (out / ".hydra" / "config.yaml").is_file()
    assert not list(out.rglob("*.tmp"))  # nothing half-written
