"""The ready configs on the real datasets in ../shared/data, at tiny sizes (skipped when it is absent).

Every ready config builds and holds what its files hold; the ready mixes meta-train and
evaluate through ``metaseg-train`` / ``metaseg-eval`` (and the same engine in-process); and
``metaseg-eval data=folder`` scores a synthetic (4-class) checkpoint on a binary folder.
"""

import json

import numpy as np
import pytest
from PIL import Image

from metaseg.data import build_mix
from metaseg.data.mix import train_names
from metaseg.engine.evaluation.checkpoint_eval import evaluate_checkpoint
from metaseg.engine.training.trainer import train
from tests.conftest import compose_cfg, run_cli
from tests.data_fixtures import SHARED_DATA

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "retina_drive").is_dir(),
                                reason=f"real datasets not found at {SHARED_DATA}")
ROOT = f"data.root={SHARED_DATA}"
TINY_DATA = ["data.max_images=10", "data.val_fraction=0.3", "data.size=32", "data.workers=2"]  # 3 validation images
TINY_RUN = ["meta.shots=2", "meta.query=2", "meta.inner_steps=1", "meta.meta_batch=2", "trainer.max_steps=2",
            "trainer.eval_every=0", "trainer.device=cpu", "eval.shots=2", "eval.episodes=1",
            "model.extra.decoder_channels=[16,8,8]"]
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


def test_metaseg_data_summarises_and_draws_retina_lodo(tmp_path):
    out = run_cli("metaseg-data", "data=retina_lodo", ROOT, *TINY_DATA, "samples=3",
                  f"hydra.run.dir={tmp_path / 'D'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "retina_drive" in out.stdout and "heldout" in out.stdout
    summary = json.loads((tmp_path / "D" / "summary.json").read_text())
    assert {n: d["role"] for n, d in summary["datasets"].items()} == {
        "retina_stare": "train", "retina_chasedb1": "train", "retina_drive": "heldout"}
    assert summary["datasets"]["retina_drive"]["size_min"] == [565, 584]
    assert sum(summary["datasets"]["retina_drive"]["splits"].values()) == 10
    grid = Image.open(tmp_path / "D" / "samples.png")
    assert grid.size == (3 * 130 + 2, 3 * 130 + 2)


@pytest.fixture(scope="module")
def lodo_run(tmp_path_factory):
    """``metaseg-train data=retina_lodo`` at tiny sizes, once for the tests below."""
    root = tmp_path_factory.mktemp("lodo")
    out = run_cli("metaseg-train", "data=retina_lodo", ROOT, *TINY_DATA, *TINY_RUN, f"hydra.run.dir={root / 'T'}",
                  cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    return root, root / "T"


def test_retina_lodo_trains_through_the_command(lodo_run):
    _, run = lodo_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics["datasets"]) == ["retina_drive"] and metrics["classes"] == ["background", "foreground"]
    assert metrics["step"] == 2 and 0 <= metrics["datasets"]["retina_drive"]["adapted"]["miou"]["mean"] <= 1
    assert "maml-training Unet-resnet18 on ['retina_stare', 'retina_chasedb1'], held out ['retina_drive']" in (
        run / "train.log").read_text()


def test_retina_lodo_checkpoint_evaluates_through_the_command(lodo_run, tmp_path):
    _, run = lodo_run
    out = run_cli("metaseg-eval", f"checkpoint={run / 'checkpoints' / 'last.pt'}", "device=cpu", "eval.shots=2",
                  "eval.episodes=2", f"hydra.run.dir={tmp_path / 'E'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "E" / "eval.json").read_text())
    assert result["head"]["kind"] == "checkpoint" and result["datasets"]["retina_drive"]["images"] == 10
    assert len(result["datasets"]["retina_drive"]["adapted"]["per_episode"]) == 2


def test_retina_lodo_checkpoint_on_another_site_as_a_folder(lodo_run, tmp_path):
    # same binary label space, so the checkpoint's own head is kept
    _, run = lodo_run
    out = run_cli("metaseg-eval", f"checkpoint={run / 'checkpoints' / 'last.pt'}", "data=folder",
                  f"data.root={SHARED_DATA / 'retina_stare'}", "data.max_images=5", "device=cpu", "eval.shots=2",
                  "eval.episodes=1", f"hydra.run.dir={tmp_path / 'F'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "F" / "eval.json").read_text())
    assert result["head"]["kind"] == "checkpoint" and result["datasets"]["folder"]["images"] == 5


def test_synthetic_checkpoint_evaluates_a_binary_folder(tmp_path):
    run = tmp_path / "S"
    train(compose_cfg("train", ["experiment=smoke", "trainer.max_steps=1", "trainer.eval_every=0",
                                "trainer.device=cpu", "eval.episodes=0", "trainer.best_metric=mean.zero_shot_miou",
                                "model.extra.decoder_channels=[16,8,8]"]),
          run)
    out = run_cli("metaseg-eval", f"checkpoint={run / 'checkpoints' / 'last.pt'}", "data=folder",
                  f"data.root={SHARED_DATA / 'retina_stare'}", "data.max_images=6", "device=cpu", "eval.shots=2",
                  "eval.episodes=2", f"hydra.run.dir={tmp_path / 'E'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "E" / "eval.json").read_text())
    assert result["head"]["kind"] == "new" and result["classes"] == ["background", "foreground"]
    res = result["datasets"]["folder"]
    assert res["images"] == 6 and len(res["adapted"]["per_episode"]) == 2
    assert 0 <= res["adapted"]["miou"]["mean"] <= 1


@pytest.mark.parametrize("name", ["binary_mix", "camvid_sequences"])
def test_ready_mixes_train_and_evaluate(tmp_path, name):
    cfg = compose_cfg("train", [f"data={name}", ROOT, *TINY_DATA, *TINY_RUN])
    metrics = train(cfg, tmp_path / "T")
    held = {"binary_mix": ["skin_ph2"], "camvid_sequences": ["camvid_0001TP"]}[name]
    assert list(metrics["datasets"]) == held
    assert len(metrics["datasets"][held[0]]["zero_shot"]["iou"]) == len(cfg.data.classes)
    ev = compose_cfg("eval", [f"checkpoint={tmp_path / 'T' / 'checkpoints' / 'last.pt'}", "device=cpu",
                              "eval.shots=2", "eval.episodes=1"])
    result = evaluate_checkpoint(ev, tmp_path / "E")
    assert result["head"]["kind"] == "checkpoint" and list(result["datasets"]) == held
    assert 0 <= result["mean"]["adapted_miou"] <= 1
