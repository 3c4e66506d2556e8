"""What metaseg-eval writes: eval.json (contract + inputs), eval.md, eval.csv, PNG grids, tensorboard; checkpoint=none."""

import csv
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from metaseg.config import EvalConfig
from metaseg.engine.evaluation import report as eval_report
from metaseg.engine.evaluation.checkpoint_eval import evaluate_checkpoint
from metaseg.engine.evaluation.protocol import evaluate_heldout
from metaseg.meta import MAML
from metaseg.utils.errors import ConfigError
from tests.helpers import FullRes, TinyNet, compose_cfg, seeded_checkpoint

CPU = torch.device("cpu")
SMALL_DATA = ["data=synthetic", "data.size=32", "data.datasets.synth_4.num_images=8",
              "data.datasets.synth_5.num_images=8"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained smoke-sized checkpoint: evaluation only needs weights and a config."""
    cfg = compose_cfg("train", ["experiment=smoke", "trainer.device=cpu", "meta.inner_steps=2"])
    return seeded_checkpoint(tmp_path_factory.mktemp("ckpt") / "last.pt", cfg, seed=0, step=7)


@pytest.fixture(scope="module")
def evaluated(checkpoint, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval")
    cfg = compose_cfg("eval", [f"checkpoint={checkpoint}", "device=cpu", "eval.shots=[1,2]", "eval.episodes=2",
                               "eval.pictures=3", "eval.batch_size=8"])
    result = evaluate_checkpoint(cfg, run_dir)
    return run_dir, result


def test_eval_json_keeps_the_contract_and_records_the_inputs(evaluated, checkpoint):
    run_dir, _ = evaluated
    result = json.loads((run_dir / "eval.json").read_text())
    assert set(result["datasets"]) == {"synth_4", "synth_5"}
    for res in result["datasets"].values():
        z, a = res["zero_shot"], res["adapted"]
        for key in ("miou", "mf1", "pixel_acc"):
            assert 0 <= z[key] <= 1 and 0 <= z["image"][key] <= 1
            assert 0 <= a[key]["mean"] <= 1 and a[key]["ci95"] >= 0
        assert len(z["iou"]) == len(z["f1"]) == len(z["precision"]) == len(z["recall"]) == 4
        assert a["shots"] == 1 and a["miou"] == a["1"]["miou"]  # top level = the first k of the list
        assert a["2"]["shots"] == 2 and len(a["2"]["per_episode"]) == 2
        assert len(a["2"]["iou"]["mean"]) == len(a["2"]["image"]["iou"]["ci95"]) == 4
        assert a["adapt_steps"] == 2 and a["adapt_lr"] == 0.1  # from the checkpoint's meta config
        assert a["scored"] == 12 - 2
    assert result["checkpoint"] == str(checkpoint) and result["step"] == 7 and result["seed"] == 0
    assert result["config"]["eval"]["shots"] == [1, 2]
    assert result["config"]["meta"]["inner_steps"] == 2  # the meta config used: the checkpoint's
    assert result["protocol"]["shots"] == [1, 2] and result["protocol"]["episodes"] == 2
    assert result["classes"] == ["background", "disk", "square", "triangle"]
    assert result["pictures"] == {"synth_4": "pictures/synth_4.png", "synth_5": "pictures/synth_5.png"}
    assert set(result["mean"]["adapted"]) == {"1", "2"}


def test_eval_md_tables_show_the_json_numbers(evaluated):
    run_dir, result = evaluated
    md = (run_dir / "eval.md").read_text()
    res = result["datasets"]["synth_4"]
    z, a2 = res["zero_shot"]["miou"], res["adapted"]["2"]["miou"]
    assert "| dataset | zero-shot | 1-shot | 2-shot |" in md
    row = next(line for line in md.splitlines() if line.startswith("| synth_4 |"))  # first table: mIoU, dataset
    assert f"| {100 * z:.1f} |" in row and f"{100 * a2['mean']:.1f} ± {100 * a2['ci95']:.1f}" in row
    for heading in ("## mIoU (%), dataset reduction", "## mF1 (mDice) (%), image reduction",
                    "## Per-class IoU (%), dataset reduction", "### synth_5"):
        assert heading in md
    assert "| **mean** |" in md and "| triangle |" in md
    assert "foreground" not in md  # four classes: no binary foreground tables


def test_eval_csv_has_every_number_in_long_form(evaluated):
    run_dir, result = evaluated
    with open(run_dir / "eval.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == eval_report.CSV_FIELDS

    def find(**want):
        hits = [r for r in rows if all(r[k] == str(v) for k, v in want.items())]
        assert len(hits) == 1, want
        return hits[0]

    a2 = result["datasets"]["synth_5"]["adapted"]["2"]
    r = find(dataset="synth_5", setting="adapted", shots=2, reduction="image", metric="miou", **{"class": ""})
    assert float(r["mean"]) == pytest.approx(a2["image"]["miou"]["mean"]) and r["n"] == "2"
    assert float(r["ci95"]) == pytest.approx(a2["image"]["miou"]["ci95"])
    r = find(dataset="synth_5", setting="adapted", shots=2, reduction="dataset", metric="iou", **{"class": "disk"})
    assert float(r["mean"]) == pytest.approx(a2["iou"]["mean"][1])
    z = find(dataset="synth_4", setting="zero_shot", shots=0, reduction="dataset", metric="mf1", **{"class": ""})
    assert float(z["mean"]) == pytest.approx(result["datasets"]["synth_4"]["zero_shot"]["mf1"]) and z["ci95"] == ""
    # 2 datasets x (zero-shot + 2 k) x 2 reductions x (3 summaries + 4 per-class metrics x 4 classes)
    assert len(rows) == 2 * 3 * 2 * (3 + 16)


def test_png_grid_is_drawn_and_not_blank(evaluated):
    run_dir, _ = evaluated
    img = Image.open(run_dir / "pictures" / "synth_4.png")
    assert img.mode == "RGB"
    cols = 5  # image | ground truth | zero-shot | 1-shot | 2-shot
    assert img.width == 2 * eval_report.MARGIN + cols * eval_report.PANEL + (cols - 1) * eval_report.GAP
    assert img.height > 3 * eval_report.PANEL  # three rows
    px = np.asarray(img)
    assert px.std() > 30  # not a blank canvas
    # first row's ground-truth panel holds palette colours only (plus the border), background black among them
    y0 = eval_report.MARGIN + 2 * eval_report.HEADER
    x0 = eval_report.MARGIN + eval_report.PANEL + eval_report.GAP
    gt = px[y0 : y0 + eval_report.PANEL, x0 : x0 + eval_report.PANEL].reshape(-1, 3)
    colours = {tuple(c) for c in np.unique(gt, axis=0)}
    assert (0, 0, 0) in colours and colours <= set(eval_report.palette(4)) | {(255, 255, 255)}
    photo = px[y0 : y0 + eval_report.PANEL, eval_report.MARGIN : eval_report.MARGIN + eval_report.PANEL]
    assert len(np.unique(photo.reshape(-1, 3), axis=0)) > 50  # the image panel is a photo, not labels


def test_checkpoint_none_is_a_random_init_baseline_through_the_same_protocol(tmp_path):
    overrides = ["checkpoint=none", *SMALL_DATA, "device=cpu", "eval.shots=1", "eval.episodes=2",
                 "eval.pictures=0", "meta.inner_steps=1", "meta.inner_lr=0.05"]
    a = evaluate_checkpoint(compose_cfg("eval", overrides), tmp_path / "a")
    assert a["checkpoint"] == "none" and a["step"] is None
    assert a["protocol"]["adapt_steps"] == 1 and a["protocol"]["adapt_lr"] == 0.05  # from the meta group
    assert a["config"]["model"]["arch"] == "Unet"
    for res in a["datasets"].values():
        assert res["adapted"]["shots"] == 1 and 0 <= res["adapted"]["miou"]["mean"] <= 1
    evaluate_checkpoint(compose_cfg("eval", overrides), tmp_path / "b")  # the random init is seeded
    assert json.loads((tmp_path / "a" / "eval.json").read_text())["datasets"] == \
        json.loads((tmp_path / "b" / "eval.json").read_text())["datasets"]
    assert (tmp_path / "a" / "eval.md").is_file() and not (tmp_path / "a" / "pictures").exists()
    with pytest.raises(ConfigError, match="checkpoint=none needs the data"):
        evaluate_checkpoint(compose_cfg("eval", ["checkpoint=none", "device=cpu"]), tmp_path / "c")
    assert not (tmp_path / "c" / "eval.json").exists()


def test_checkpoint_none_with_a_list_of_shots(tmp_path):
    """What ``metaseg-eval checkpoint=none eval.shots=[1,2] ...`` runs (the command itself:
    tests/integration/test_cli_end_to_end.py)."""
    evaluate_checkpoint(compose_cfg("eval", ["checkpoint=none", *SMALL_DATA, "device=cpu", "eval.shots=[1,2]",
                                             "eval.episodes=2", "eval.adapt_steps=1", "eval.pictures=1"]),
                        tmp_path / "E")
    result = json.loads((tmp_path / "E" / "eval.json").read_text())
    assert set(k for k in result["datasets"]["synth_4"]["adapted"] if k.isdigit()) == {"1", "2"}
    assert (tmp_path / "E" / "eval.md").is_file() and (tmp_path / "E" / "pictures" / "synth_5.png").is_file()


def test_binary_slide_mode_reports_foreground_scores_and_full_resolution_pictures(tmp_path):
    torch.manual_seed(0)
    learner = MAML(TinyNet(classes=2), inner_lr=0.5, inner_steps=1)
    cfg = OmegaConf.structured(EvalConfig(shots=[1], episodes=2, batch_size=4, pictures=2, mode="slide"))
    result = evaluate_heldout(learner, {"bin": FullRes()}, 2, cfg, CPU, 0, ["background", "vessel"])
    res = result["datasets"]["bin"]
    assert res["window"] == [16, 16] and res["stride"] == [8, 8]
    assert 0 <= res["zero_shot"]["fg_dice"] <= 1 and 0 <= res["adapted"]["image"]["fg_dice"]["mean"] <= 1
    md = eval_report.markdown_report(result)
    assert "## foreground Dice (%), image reduction" in md and "| vessel |" in md
    assert any(r["metric"] == "fg_iou" for r in eval_report.csv_rows(result))
    grid = result.pictures["bin"]
    assert grid.dtype == torch.uint8 and grid.shape[0] == 3 and grid.shape[2] > 4 * eval_report.PANEL
    eval_report.save_png(grid, tmp_path / "bin.png")
    assert Image.open(tmp_path / "bin.png").size == (grid.shape[2], grid.shape[1])


def test_pictures_with_max_images_show_query_images_outside_the_zero_shot_ones():
    """eval.max_images scores the first images zero-shot, but pictures show episode 0's query images."""
    torch.manual_seed(0)
    learner = MAML(TinyNet(classes=2), inner_lr=0.5, inner_steps=1)
    cfg = OmegaConf.structured(EvalConfig(shots=[1], episodes=2, batch_size=4, pictures=2, mode="slide",
                                          max_images=1))
    ds = FullRes()
    gallery: dict = {}
    from metaseg.engine.evaluation.protocol import evaluate_dataset
    res = evaluate_dataset(learner, "vessels", ds, 2, cfg, CPU, 0, gallery)  # episode 0: support 0, query 1..3
    assert res["scored"] == 1  # zero-shot scored the first image only
    assert any(i != 0 for i in gallery["indices"])  # a picture of an image zero-shot did not score
    assert all(gallery["zero_shot"][i] is not None for i in gallery["indices"])
    result = evaluate_heldout(learner, {"vessels": ds}, 2, cfg, CPU, 0, ["background", "vessel"])
    assert result.pictures["vessels"].dtype == torch.uint8


def test_tensorboard_gets_every_k_both_reductions_and_the_pictures(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from metaseg.data.mix import Normalized
    from metaseg.data.synthetic import SyntheticDomain
    from metaseg.engine.training.trainer import _log_eval

    torch.manual_seed(0)
    learner = MAML(TinyNet(), inner_lr=0.5, inner_steps=1)
    ds = Normalized(SyntheticDomain(4, 8, 32, seed=0), [0.5] * 3, [0.25] * 3)
    cfg = OmegaConf.structured(EvalConfig(shots=[1, 2], episodes=2, batch_size=4, pictures=2))
    result = evaluate_heldout(learner, {"synth_4": ds}, 4, cfg, CPU, 0, ["a", "b", "c", "d"])
    writer = SummaryWriter(str(tmp_path))
    _log_eval(writer, result, 5)
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    assert {"heldout/synth_4/zero_shot_miou", "heldout/synth_4/adapted_miou", "heldout/synth_4/1shot_miou",
            "heldout/synth_4/2shot_mf1", "heldout/synth_4/zero_shot_image_miou",
            "heldout/synth_4/adapted_image_mf1"} <= set(acc.Tags()["scalars"])
    assert acc.Scalars("heldout/synth_4/2shot_miou")[0].value == pytest.approx(
        result["datasets"]["synth_4"]["adapted"]["2"]["miou"]["mean"])
    assert acc.Tags()["images"] == ["predictions/synth_4"]
