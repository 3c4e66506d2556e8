"""The ready configs on the real datasets in ../shared/data, at tiny sizes (skipped when it is absent):
every ready config builds and holds what its files hold; metaseg-data's engine summarises a mix.
Training and evaluating on them: tests/integration/test_data_real.py."""

import json

import numpy as np
import pytest
from PIL import Image

from metaseg.data import build_mix
from metaseg.data.check import inspect_data
from metaseg.data.mix import train_names
from tests.helpers import REAL_ROOT as ROOT
from tests.helpers import REAL_TINY_DATA, SHARED_DATA, compose_cfg, needs_real_data

pytestmark = needs_real_data
SINGLE = ["retina_drive", "retina_stare", "retina_chasedb1", "polyp_kvasir_seg", "skin_ph2",
          "em_isbi2012_membrane", "scene_camvid"]
MIXES = ["retina_lodo", "binary_mix", "camvid_sequences"]


@pytest.mark.parametrize("name", SINGLE + MIXES)
def test_every_ready_config_builds(name):
    cfg = compose_cfg("train", [f"data={name}", ROOT, "data.max_images=3", "data.size=16", "data.workers=2"]).data
    mix = build_mix(cfg, need_train=bool(train_names(cfg)))
    datasets = {**mix.train, **mix.heldout}
    assert datasets and all(len(ds) == 3 for ds in datasets.values())
    for ds in datasets.values():
        image, mask = ds[0]
        assert image.shape == (3, 16, 16) and mask.shape == (16, 16)
        assert set(mask.unique().tolist()) <= set(range(mix.num_classes)) | {255}
    if name in SINGLE:
        assert list(mix.heldout) == [name] and not mix.train


def raw_mask(dataset: str, stem: str) -> np.ndarray:
    return np.array(Image.open(SHARED_DATA / dataset / "masks" / f"{stem}.png"))


def test_label_mappings_match_the_files():
    # EM: the membrane is stored as 0 and becomes the foreground
    cfg = compose_cfg("train", ["data=em_isbi2012_membrane", ROOT, "data.max_images=2", "data.size=16"]).data
    ds = build_mix(cfg, need_train=False).heldout["em_isbi2012_membrane"]
    stem = ds.base.pairs[0].stem
    _, mask = ds.full_resolution(0)
    assert np.array_equal(mask.numpy(), (raw_mask("em_isbi2012_membrane", stem) == 0).astype(np.int64))
    # CamVid: 11 = void becomes ignore, the rest keep their index; sequences filter by groups.csv
    cfg = compose_cfg("train", ["data=camvid_sequences", ROOT, "data.max_images=2", "data.size=16"]).data
    mix = build_mix(cfg)
    for name, ds in {**mix.train, **mix.heldout}.items():
        assert all(p.stem.startswith(name.split("_", 1)[1]) for p in ds.base.pairs)
    ds = mix.heldout["camvid_0001TP"]
    raw = raw_mask("scene_camvid", ds.base.pairs[1].stem).astype(np.int64)
    assert np.array_equal(ds.full_resolution(1)[1].numpy(), np.where(raw == 11, 255, raw))
    # retina vessels are a small share of the pixels
    cfg = compose_cfg("train", ["data=retina_lodo", ROOT, "data.max_images=2", "data.size=64"]).data
    for ds in build_mix(cfg).train.values():
        counts = ds.pixel_counts.sum(0)
        assert 0.03 < counts[1] / counts[:2].sum() < 0.2


def test_metaseg_data_summarises_and_draws_retina_lodo(tmp_path, capsys):
    cfg = compose_cfg("data_cmd", ["data=retina_lodo", ROOT, *REAL_TINY_DATA, "samples=3"])
    inspect_data(cfg, tmp_path / "D")
    printed = capsys.readouterr().out
    assert "retina_drive" in printed and "heldout" in printed
    summary = json.loads((tmp_path / "D" / "summary.json").read_text())
    assert {n: d["role"] for n, d in summary["datasets"].items()} == {
        "retina_stare": "train", "retina_chasedb1": "train", "retina_drive": "heldout"}
    assert summary["datasets"]["retina_drive"]["size_min"] == [565, 584]
    assert sum(summary["datasets"]["retina_drive"]["splits"].values()) == 10
    grid = Image.open(tmp_path / "D" / "samples.png")
    assert grid.size == (3 * 130 + 2, 3 * 130 + 2)
