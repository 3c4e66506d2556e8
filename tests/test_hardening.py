"""Odd inputs a user can give get one clear line or a documented result, never a traceback.

Checkpoints without a usable config, damaged or code-carrying files, a second run into a
folder that holds one, a diverging run, symbolic-link loops, an empty table, a folder that
is a file, an image too large to decode, and the wall time of a resumed run.
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
from metaseg.engine.training.budget import Budget, read_budget
from metaseg.engine.checkpoint import (
    LOCK, RunLock, claim_run_dir, digest, load_checkpoint, save_checkpoint)
from metaseg.engine.evaluation.report import markdown_report
from metaseg.engine.load import checkpoint_model, read_checkpoint
from metaseg.engine.prediction.files import list_images, load_rgb
from metaseg.engine.prediction.segment import segment_folder, validate_predict
from metaseg.engine.training.trainer import train
from metaseg.meta.safety import DivergenceError, DivergenceWatch
from metaseg.utils.errors import CheckpointError, ConfigError, DataError
from tests.conftest import compose_cfg, run_cli
from tests.data_fixtures import folder_dataset, rgb

QUICK = ["experiment=smoke", "trainer.device=cpu", "trainer.threads=1", "trainer.eval_every=0", "eval.episodes=0",
         "eval.pictures=0", "trainer.best_metric=mean.zero_shot_miou", "trainer.monitor_tasks=0",
         "model.extra.decoder_channels=[16,8,8]"]


def quick(*overrides):
    return compose_cfg("train", [*QUICK, *overrides])


def one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-step run: its folder holds a finished run and a loadable last.pt."""
    d = tmp_path_factory.mktemp("hardening") / "run"
    train(quick("trainer.max_steps=1"), d)
    return d


# -- checkpoints ------------------------------------------------------------------------------
def test_checkpoint_with_an_empty_config_is_one_line(tmp_path):
    path = tmp_path / "empty_config.pt"
    torch.save({"format": 1, "version": __version__, "model": {"w": torch.zeros(2)}, "config": {}}, path)
    with pytest.raises(CheckpointError) as exc:
        read_checkpoint(str(path))  # what metaseg-eval and metaseg-predict checkpoint= read
    assert str(path) in one_line(exc) and "incomplete config" in str(exc.value)


def test_a_damaged_checkpoint_is_refused_by_its_digest(run, tmp_path):
    path = tmp_path / "last.pt"
    shutil.copy(run / "checkpoints" / "last.pt", path)
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


def test_weights_that_do_not_fit_name_the_first_mismatch(run, tmp_path):
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
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


def test_metaseg_report_prints_its_error_once(tmp_path):
    out = run_cli("metaseg-report", str(tmp_path / "nope"), cwd=tmp_path, timeout=120)
    assert out.returncode == 2
    assert out.stderr.count("is not a folder") == 1, out.stderr


# -- run folders ------------------------------------------------------------------------------
def test_a_second_fresh_run_into_a_run_folder_is_refused(run, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(run, d)
    before = (d / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(CheckpointError) as exc:
        train(quick("trainer.max_steps=1"), d)
    text = one_line(exc)
    assert str(d) in text and "trainer.resume=auto" in text and "trainer.overwrite=true" in text
    assert (d / "checkpoints" / "last.pt").read_bytes() == before and not (d / LOCK).exists()


def test_overwrite_starts_afresh_and_resume_auto_still_continues(run, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(run, d)
    (d / "tb" / "old-events").write_text("the earlier run's")
    train(quick("trainer.max_steps=1", "trainer.overwrite=true"), d)
    assert not (d / "tb" / "old-events").exists() and load_checkpoint(d / "checkpoints" / "last.pt")["step"] == 1
    metrics = train(quick("trainer.max_steps=2", "trainer.resume=auto"), d)
    assert metrics["step"] == 2 and not (d / LOCK).exists()
    with pytest.raises(CheckpointError, match="drop one of them"):
        train(quick("trainer.max_steps=2", "trainer.resume=auto", "trainer.overwrite=true"), d)


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


def test_a_diverging_run_stops_before_it_replaces_a_good_checkpoint(run, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(run, d)
    good = (d / "checkpoints" / "last.pt").read_bytes()
    resume = ["trainer.max_steps=3", "trainer.ckpt_every=1", "trainer.resume=auto", "trainer.resume_strict=false"]
    with pytest.raises(DivergenceError) as exc:
        train(quick(*resume, "meta.outer_lr=1e30"), d)
    assert "meta.outer_lr (now 1e+30)" in one_line(exc)
    with pytest.raises(DivergenceError) as exc:
        train(quick(*resume, "meta.inner_lr=1e6"), d)
    assert "meta.inner_lr (now 1e+06)" in one_line(exc)
    assert (d / "checkpoints" / "last.pt").read_bytes() == good


# -- budget -----------------------------------------------------------------------------------
def test_budget_seconds_add_up_over_sittings(run, tmp_path):
    b = Budget(torch.nn.Conv2d(3, 3, 1))
    b.load_state_dict({"forward_images": 4, "train_seconds": 2.0, "seconds": 10.0})
    b.start_clock()
    time.sleep(0.01)
    assert 10.01 <= b.seconds < 20 and b.state_dict()["seconds"] >= 10.01
    b.load_state_dict({"train_seconds": 2.0})  # a checkpoint from before seconds were kept
    assert b.earlier_seconds == 2.0
    d = tmp_path / "run"
    shutil.copytree(run, d)
    first = read_budget(d)["total"]["seconds"]
    train(quick("trainer.max_steps=2", "trainer.resume=auto"), d)
    timing = json.loads((d / "timing.json").read_text())
    # this sitting's time plus the first one's up to its last checkpoint (not just this sitting's)
    assert read_budget(d)["total"]["seconds"] >= timing["seconds"] + 0.5 * first


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


def test_symlink_loops_are_listed_as_skipped_by_predict(run, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rgb(16, 20, 0).save(images / "a.png")
    _loop(images / "loop.png")
    assert [p.name for p in list_images(images)] == ["a.png", "loop.png"]
    assert load_rgb(images / "loop.png") == (None, "Too many levels of symbolic links")
    cfg = compose_cfg("predict", [f"checkpoint={run / 'checkpoints' / 'last.pt'}", f"images={images}",
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


def test_metaseg_train_refuses_an_occupied_run_dir_before_hydra_touches_it(tmp_path):
    """A fresh metaseg-train into a finished run's folder stops before Hydra rewrites its .hydra/ and log."""
    from tests.conftest import run_cli

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("the earlier run's\n")
    (run / "metrics.json").write_text("{}\n")
    result = run_cli("metaseg-train", "experiment=smoke", "trainer.device=cpu", f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 2
    assert "already holds a finished run (metrics.json)" in result.stderr and "trainer.resume=auto" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (run / ".hydra" / "config.yaml").read_text() == "the earlier run's\n"  # untouched
    assert not (run / "train.log").exists()
