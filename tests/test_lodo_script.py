"""scripts/lodo.py: the study's runs, resumable, and its tables read from the runs' own results."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT
from tests.data_fixtures import folder_dataset
from tests.test_data_patches import NAMES, stripes

TINY = ["data.size=16", "data.train=[retina_drive,retina_stare]", "model.extra.decoder_channels=[8,8,8]",
        "trainer.max_steps=2", "meta.inner_steps=1", "meta.shots=2", "meta.query=2", "eval.episodes=2",
        "eval.max_images=2", "eval.support_patches=2", "eval.val_episodes=1", "eval.tune_lrs=[0.1]",
        "eval.tune_steps=[1]", "eval.pictures=1", "eval.shots=[2,1]", "data.val_fraction=0.4",
        "trainer.device=cpu"]


def run(out, root, *extra):
    cmd = [sys.executable, str(ROOT / "scripts" / "lodo.py"), "--out", str(out), "--data-root", str(root),
           "--folds", "retina_chasedb1", "--arms", "erm", "scratch", "--scratch-steps", "1", *extra, "--set", *TINY]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600)


def test_study_runs_resumes_and_tabulates(tmp_path):
    for key, (h, w) in {"a": (40, 48), "b": (36, 60), "c": (50, 50)}.items():
        folder_dataset(tmp_path / "data" / NAMES[key], n=8, h=h, w=w, masks=[stripes(h, w)] * 8)
    out = tmp_path / "study"
    first = run(out, tmp_path / "data")
    assert first.returncode == 0, first.stderr[-2000:]
    for arm in ("erm", "scratch"):
        assert (out / "retina_chasedb1" / arm / "done.json").exists()
    results = json.loads((out / "results.json").read_text())
    erm = json.loads((out / "retina_chasedb1" / "erm" / "metrics.json").read_text())
    held = erm["datasets"]["retina_chasedb1"]
    # the table holds the run's own image-level Dice, for every k, and its budget
    assert results["retina_chasedb1/erm"]["scores"]["2"]["fg_dice"] == held["adapted"]["2"]["image"]["fg_dice"]
    assert results["retina_chasedb1/erm"]["budget"]["outer_steps"] == 2
    assert held["window"] == [16, 16]  # scored whole by sliding window
    assert results["retina_chasedb1/scratch"]["tune"] == {"adapt_lr": 0.1, "adapt_steps": 1}
    table = (out / "results.md").read_text()
    assert f"{held['adapted']['2']['image']['fg_dice']['mean']:.3f}" in table and "| scratch |" in table
    stamp = (out / "retina_chasedb1" / "erm" / "metrics.json").stat().st_mtime_ns
    second = run(out, tmp_path / "data")  # finished runs are not redone
    assert second.returncode == 0 and "done before" in second.stdout
    assert (out / "retina_chasedb1" / "erm" / "metrics.json").stat().st_mtime_ns == stamp


def test_a_failing_run_is_reported_and_not_marked_done(tmp_path):
    result = run(tmp_path / "study", tmp_path / "missing")  # no data there
    assert result.returncode == 1 and "FAILED" in result.stdout
    assert not (tmp_path / "study" / "retina_chasedb1" / "erm" / "done.json").exists()
    assert "data" in (tmp_path / "study" / "retina_chasedb1" / "erm" / "log.txt").read_text()


def test_rescoring_trained_arms_with_tuning_on_the_same_kind(tmp_path):
    """--checkpoints-from evaluates another study's best.pt without training; --tune-same-kind
    tunes on the held-out set's kind only (the retina sites, not the lesions)."""
    for key, (h, w) in {"a": (40, 48), "b": (36, 60), "c": (50, 50)}.items():
        folder_dataset(tmp_path / "data" / NAMES[key], n=8, h=h, w=w, masks=[stripes(h, w)] * 8)
    folder_dataset(tmp_path / "data" / "skin_ph2", n=8, h=40, w=40, masks=[stripes(40, 40)] * 8)
    tiny = [o if not o.startswith("data.train=") else "data.train=[retina_drive,retina_stare,skin_ph2]" for o in TINY]
    root = tmp_path / "data"

    def study(out, *extra):
        cmd = [sys.executable, str(ROOT / "scripts" / "lodo.py"), "--out", str(out), "--data-root",
               str(root), "--folds", "retina_chasedb1", "--arms", "erm", *extra, "--set", *tiny]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})

    assert study(tmp_path / "a").returncode == 0
    trained = json.loads((tmp_path / "a" / "retina_chasedb1" / "erm" / "metrics.json").read_text())
    assert trained["tune"]["datasets"] == ["retina_drive", "retina_stare", "skin_ph2"]  # all, by default
    (tmp_path / "data").rename(tmp_path / "moved")  # the checkpoints' data.root is gone: data_root finds it
    root = tmp_path / "moved"
    result = study(tmp_path / "b", "--checkpoints-from", str(tmp_path / "a"), "--tune-same-kind")
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "b" / "retina_chasedb1" / "erm"
    assert not (run / "checkpoints").exists()  # evaluated, not trained
    ev = json.loads((run / "eval.json").read_text())
    assert ev["tune"]["datasets"] == ["retina_drive", "retina_stare"]
    assert ev["checkpoint"].endswith(os.path.join("a", "retina_chasedb1", "erm", "checkpoints", "best.pt"))
    assert "retina_chasedb1/erm" in json.loads((tmp_path / "b" / "results.json").read_text())
    missing = study(tmp_path / "c", "--checkpoints-from", str(tmp_path / "nothing"))
    assert missing.returncode != 0 and "has no checkpoints/best.pt for retina_chasedb1/erm" in missing.stderr
