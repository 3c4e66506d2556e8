"""Odd inputs a user can give get one clear line or a documented result, never a traceback.

Checkpoints without a usable config, damaged or code-carrying files, a live run's lock, a
diverging loss, symbolic-link loops, an empty table, a folder that is a file, an image too large
to decode, and a budget over several sittings. What a second run into a finished run's folder
does is tests/integration/test_hardening.py.
"""

import json
import os
import shutil
import time
import warnings
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from metaseg import __version__
from metaseg.data.decode import MAX_PIXELS, ImageTooLarge, Pair, probe, read_image
from metaseg.data.folder import list_files
from metaseg.data.labels import build_label_map
from metaseg.engine.checkpoint import LOCK, RunLock, claim_run_dir, digest, load_checkpoint, save_checkpoint
from metaseg.engine.evaluation.report import markdown_report
from metaseg.engine.load import checkpoint_model, read_checkpoint
from metaseg.engine.prediction.files import list_images, load_rgb
from metaseg.engine.prediction.segment import segment_folder, validate_predict
from metaseg.engine.training.budget import Budget
from metaseg.meta.safety import DivergenceError, DivergenceWatch
from metaseg.utils.errors import CheckpointError, ConfigError, DataError
from tests.helpers import SMALL_DECODER, compose_cfg, folder_dataset, rgb, seeded_checkpoint


def one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A smoke-sized checkpoint (seeded weights): what metaseg-eval and metaseg-predict read."""
    cfg = compose_cfg("train", ["experiment=smoke", "trainer.device=cpu", SMALL_DECODER])
    return seeded_checkpoint(tmp_path_factory.mktemp("hardening") / "last.pt", cfg, seed=0, step=1)


# -- checkpoints ------------------------------------------------------------------------------
def test_checkpoint_with_an_empty_config_is_one_line(tmp_path):
    path = tmp_path / "empty_config.pt"
    torch.save({"format": 1, "version": __version__, "model": {"w": torch.zeros(2)}, "config": {}}, path)
    with pytest.raises(CheckpointError) as exc:
        read_checkpoint(str(path))  # what metaseg-eval and metaseg-predict checkpoint= read
    assert str(path) in one_line(exc) and "incomplete config" in str(exc.value)


def test_a_damaged_checkpoint_is_refused_by_its_digest(checkpoint, tmp_path):
    path = tmp_path / "last.pt"
    shutil.copy(checkpoint, path)
    ckpt = load_checkpoint(path)
    assert ckpt["digest"] == digest(ckpt) and ckpt["digest"].startswith("sha256:")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 2000] = bytes(b ^ 0x5A for b in data[middle:middle + 2000])
    path.write_bytes(bytes(data))
    torch.load(path, weights_only=True)  # torch alone loads it, with changed numbers
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    assert str(path) in one_line(exc) and "damaged" in str(exc.value)


def test_checkpoints_without_a_digest_still_load_and_saving_replaces_a_stale_one(tmp_path):
    old = {"format": 1, "version": __version__, "model": {"w": torch.ones(3)}, "config": {"seed": 0}}
    torch.save(old, tmp_path / "old.pt")
    assert torch.equal(load_checkpoint(tmp_path / "old.pt")["model"]["w"], torch.ones(3))
    save_checkpoint(tmp_path / "new.pt", model={"w": torch.ones(3)}, config={}, digest="sha256:stale")
    assert load_checkpoint(tmp_path / "new.pt")["digest"] != "sha256:stale"


def test_weights_that_do_not_fit_name_the_first_mismatch(checkpoint, tmp_path):
    ckpt = load_checkpoint(checkpoint)
    key = next(iter(ckpt["model"]))
    ckpt["model"][key] = torch.zeros(3)
    save_checkpoint(tmp_path / "bad.pt", **ckpt)
    ckpt, train_cfg = read_checkpoint(str(tmp_path / "bad.pt"))
    with pytest.raises(CheckpointError) as exc:
        checkpoint_model(ckpt, train_cfg, ckpt["classes"], str(tmp_path / "bad.pt"))
    assert f"size mismatch for {key}: copying a param with shape" in one_line(exc)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


class Unknown:
    pass


@pytest.mark.parametrize("payload", [Evil(), Unknown()], ids=["system-call", "unknown-class"])
def test_a_code_carrying_file_is_refused_without_unsafe_advice_or_escapes(tmp_path, payload):
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "model": payload, "config": {}}, path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    text = one_line(exc)
    assert str(path) in text and "plain data" in text
    assert "weights_only" not in text and "\x1b" not in text


# -- run folders ------------------------------------------------------------------------------
def test_a_live_run_locks_its_folder_and_a_killed_one_does_not(tmp_path):
    trainer_cfg = SimpleNamespace(resume="auto", overwrite=False)
    held = claim_run_dir(tmp_path, trainer_cfg)
    try:
        with pytest.raises(CheckpointError) as exc:
            claim_run_dir(tmp_path, trainer_cfg)
        assert f"pid {os.getpid()}" in one_line(exc) and "another hydra.run.dir" in str(exc.value)
    finally:
        held.release()
    # a lock file left by a killed process (its pid is gone, nobody holds the lock) does not block
    (tmp_path / LOCK).write_text(json.dumps({"pid": 2 ** 22 + 1, "host": "x", "since": "then"}))
    claim_run_dir(tmp_path, trainer_cfg).release()
    assert not (tmp_path / LOCK).exists()
    RunLock(tmp_path).release()  # releasing a lock never taken does nothing


# -- divergence -------------------------------------------------------------------------------
def test_divergence_watch_names_alpha_or_beta():
    w = torch.nn.Parameter(torch.ones(10))
    watch = DivergenceWatch([w], inner_lr=0.1, outer_lr=0.001)
    watch.check(1, {"support_loss_before": 0.7, "query_loss_after": 0.6})
    watch.check(2, {"support_loss_before": 50.0, "query_loss_after": 1e5})  # bad, not orders of magnitude
    with pytest.raises(DivergenceError, match=r"alpha.*smaller meta.inner_lr \(now 0.1\)"):
        watch.check(3, {"support_loss_before": 0.7, "query_loss_after": 1e11})
    with pytest.raises(DivergenceError, match=r"beta.*smaller meta.outer_lr \(now 0.001\)"):
        watch.check(3, {"support_loss_before": 1e9, "query_loss_after": 1e11})
    with torch.no_grad():
        w.mul_(5e3)
    with pytest.raises(DivergenceError, match=r"norm grew.*beta.*meta.outer_lr"):
        watch.check(4, {})
    erm = DivergenceWatch([torch.ones(3)], inner_lr=None, outer_lr=0.5)
    erm.check(1, {"support_loss_before": 0.7})
    with pytest.raises(DivergenceError, match=r"beta.*meta.outer_lr \(now 0.5\)"):
        erm.check(2, {"support_loss_before": 0.7, "query_loss_after": 1e11})


# -- budget -----------------------------------------------------------------------------------
def test_budget_clock_adds_the_earlier_sittings_seconds():
    b = Budget(torch.nn.Conv2d(3, 3, 1))
    b.load_state_dict({"forward_images": 4, "train_seconds": 2.0, "seconds": 10.0})
    b.start_clock()
    time.sleep(0.01)
    assert 10.01 <= b.seconds < 20 and b.state_dict()["seconds"] >= 10.01
    b.load_state_dict({"train_seconds": 2.0})  # a checkpoint from before seconds were kept
    assert b.earlier_seconds == 2.0
    # a resumed run's budget.json: tests/integration/test_hardening.py


# -- files ------------------------------------------------------------------------------------
def _loop(path):
    os.symlink(path.name, path)  # a link to itself: every open fails with "Too many levels of symbolic links"


def test_symlink_loops_are_reported_by_the_data_checks(tmp_path):
    folder_dataset(tmp_path, n=3)
    for sub in ("images", "masks"):
        _loop(tmp_path / sub / "loop.png")
    assert "loop" in list_files(tmp_path / "images", (".png",), "folder")
    cfg = compose_cfg("eval", ["checkpoint=x.pt", "data=folder", f"data.root={tmp_path}", "data.size=8",
                               "data.workers=1"])
    from metaseg.data import build_mix
    with pytest.raises(DataError) as exc:
        build_mix(cfg.data, need_train=False)
    assert "loop.png (Too many levels of symbolic links)" in one_line(exc)


def test_symlink_loops_are_listed_as_skipped_by_predict(checkpoint, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rgb(16, 20, 0).save(images / "a.png")
    _loop(images / "loop.png")
    assert [p.name for p in list_images(images)] == ["a.png", "loop.png"]
    assert load_rgb(images / "loop.png") == (None, "Too many levels of symbolic links")
    cfg = compose_cfg("predict", [f"checkpoint={checkpoint}", f"images={images}",
                                  f"out={tmp_path / 'out'}", "device=cpu", "workers=1", "overlays=false"])
    result = segment_folder(cfg)
    assert result["written"] == 1 and [s["file"] for s in result["skipped"]] == ["loop.png"]


def _rendered_tables(markdown: str) -> list[list[str]]:
    tables, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


def test_eval_tables_without_episodes_render():
    zero = {"miou": 0.5, "mf1": 0.6, "fg_iou": 0.4, "fg_dice": 0.5, "iou": [0.6, 0.4],
            "image": {"miou": 0.5, "mf1": 0.6, "fg_iou": 0.4, "fg_dice": 0.5}}
    md = markdown_report({"classes": ["background", "foreground"], "datasets": {"a": {"zero_shot": zero},
                                                                                 "b": {"zero_shot": zero}}})
    tables = _rendered_tables(md)
    assert len(tables) == 10
    for table in tables:
        cells = [line.count("|") - 1 for line in table]
        assert len(set(cells)) == 1, table  # header, rule and rows: as many cells each


def test_predict_out_naming_a_file_is_one_line(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "taken").write_text("")
    for out in ("taken", "taken/sub"):
        cfg = compose_cfg("predict", ["checkpoint=x.pt", f"images={tmp_path / 'images'}", f"out={tmp_path / out}"])
        with pytest.raises(ConfigError) as exc:
            validate_predict(cfg)
        assert f"out={str(tmp_path / out)!r}" in one_line(exc) and "give a folder" in str(exc.value)


@pytest.mark.parametrize("side", [10_000, 14_000])  # over Pillow's warning limit; over its error limit
def test_a_huge_image_is_refused_from_its_header_in_one_line(tmp_path, side):
    path = tmp_path / "huge.png"
    Image.new("1", (side, side)).save(path)  # 1 bit per pixel: small to write, large to decode
    assert side * side > MAX_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning would fail the test
        with pytest.raises(ImageTooLarge) as exc:
            read_image(path)
        text = one_line(exc)
        assert "megapixels" in text and "downscale" in text
        assert load_rgb(path) == (None, text)
        found = probe(Pair("huge", path, path), build_label_map("d", compose_cfg(
            "eval", ["checkpoint=x.pt", "data=folder"]).data.datasets.folder, ["background", "foreground"]))
        assert found.problem[0] == "unreadable" and "megapixels" in found.problem[1]
