"""scripts/study.py: every arm of a fold, staged arms from the fold's erm run, budgets added,
tables and figures read from the runs' own results, finished runs not redone.

Slow: the script starts a process per run (five arms, a zero-shot evaluation, a failing fold),
about 80 s on two idle cores. The engine it drives (staged init_from, budgets, curves, tuning,
slide scoring) is in the default suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.helpers import ROOT, vessel_folders

pytestmark = pytest.mark.slow

TINY = ["data.size=16", "data.train=[retina_drive,retina_stare]", "model.extra.decoder_channels=[8,8,8]",
        "trainer.max_steps=2", "trainer.eval_every=1", "meta.shots=2", "meta.query=2", "meta.meta_batch=2",
        "eval.episodes=2", "eval.max_images=2", "eval.support_patches=2", "eval.tune_lrs=[0.1]",
        "eval.tune_steps=[1]", "eval.tune_episodes=1", "eval.pictures=0", "eval.shots=[2,1]",
        "eval.curve_steps=[0,1,2]", "eval.curve_shots=[2]", "eval.batch_size=8", "data.val_fraction=0.4", "trainer.device=cpu"]


def study(out, root, *extra, arms=("erm", "fomaml", "maml", "erm_more", "scratch")):
    cmd = [sys.executable, str(ROOT / "scripts" / "study.py"), "--out", str(out), "--data-root", str(root),
           "--folds", "retina_chasedb1", "--threads", "1", "--shots", "2", "--arms", *arms, *extra, "--set", *TINY,
           "--set-meta", "trainer.max_steps=1", "meta.inner_steps=1", "eval.val_episodes=1"]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_study_runs_every_arm_from_one_erm_run_and_tabulates(tmp_path):
    vessel_folders(tmp_path / "data")
    out = tmp_path / "study"
    first = study(out, tmp_path / "data")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    fold = out / "retina_chasedb1"
    staged = yaml.safe_load((fold / "fomaml" / ".hydra" / "config.yaml").read_text())
    assert staged["meta"]["init_from"] == str(fold / "erm" / "checkpoints" / "best.pt")
    assert staged["meta"]["algorithm"] == "fomaml" and staged["trainer"]["max_steps"] == 1
    twin = yaml.safe_load((fold / "erm_more" / ".hydra" / "config.yaml").read_text())
    assert twin["meta"]["algorithm"] == "erm" and twin["meta"]["init_from"] == staged["meta"]["init_from"]
    results = json.loads((out / "results.json").read_text())
    erm = json.loads((fold / "erm" / "metrics.json").read_text())["datasets"]["retina_chasedb1"]
    # the table's numbers are the run's own dataset-level Dice, and its curve
    episodes = [ep["fg_dice"] for ep in erm["adapted"]["2"]["per_episode"]]
    assert results["retina_chasedb1/erm"]["shots"]["2"] == {**{k: erm["adapted"]["2"]["fg_dice"][k]
                                                               for k in ("mean", "ci95")}, "per_episode": episodes}
    assert results["retina_chasedb1/erm"]["curve"] == erm["curve"]
    # a staged arm's budget adds its erm run's: 2 + 1 outer steps; the twin processed the same images
    assert results["retina_chasedb1/erm"]["budget"]["outer_steps"] == 2
    assert results["retina_chasedb1/fomaml"]["budget"]["outer_steps"] == 3
    assert (results["retina_chasedb1/erm_more"]["budget"]["forward_images"]
            == results["retina_chasedb1/fomaml"]["budget"]["forward_images"])
    zero = json.loads((fold / "erm" / "zero_shot" / "eval.json").read_text())["datasets"]["retina_chasedb1"]
    assert zero["scored"] == 8 and "adapted" not in zero  # every held-out image, no adaptation
    assert zero["stride"] == [8, 8]  # half-overlapping windows
    assert results["retina_chasedb1/erm"]["zero_shot_all"] == {"fg_dice": zero["zero_shot"]["fg_dice"], "images": 8}
    table = (out / "results.md").read_text()
    assert f"{erm['adapted']['2']['fg_dice']['mean']:.3f}" in table and "| scratch |" in table
    # paired against erm, episode by episode (the same seeded episodes for every arm), recomputed here
    fo = json.loads((fold / "fomaml" / "metrics.json").read_text())["datasets"]["retina_chasedb1"]
    assert [ep["support"] for ep in fo["adapted"]["2"]["per_episode"]] == [
        ep["support"] for ep in erm["adapted"]["2"]["per_episode"]]
    diffs = [a["fg_dice"] - b["fg_dice"] for a, b in zip(fo["adapted"]["2"]["per_episode"],
                                                       erm["adapted"]["2"]["per_episode"])]
    mean = sum(diffs) / len(diffs)
    sd = (sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)) ** 0.5
    against = table.split("### Against erm")[1]  # the first: at each arm's tuned steps
    row = next(line for line in against.splitlines() if line.startswith("| fomaml |"))
    assert f"{mean:+.3f} ± {1.96 * sd / len(diffs) ** 0.5:.3f}" in row
    assert "### Against erm at k = 1:" in table  # the other k of the protocol, paired the same way
    versus_scratch = table.split("### Against scratch")[1].split("###")[0]
    assert "| erm | " in versus_scratch and "| scratch | " not in versus_scratch
    short = (out / "summary.md").read_text()
    assert f"| erm, 2-shot (tuned steps) | {erm['adapted']['2']['fg_dice']['mean']:.3f} ± " in short
    def after_one_step(arm):  # a training run's metrics.json, scratch's eval.json
        path = fold / arm / ("eval.json" if arm == "scratch" else "metrics.json")
        return json.loads(path.read_text())["datasets"]["retina_chasedb1"]["curve"]["shots"]["2"]["1"]["mean"]
    best = max((after_one_step(a), a) for a in ("erm", "fomaml", "maml", "erm_more", "scratch"))
    assert f"| best arm, 2-shot after 1 step | {best[1]} {best[0]:.3f} |" in short
    gain = table.split("### Gain of adaptation")[1]
    assert "| erm | " in gain and "| erm | – |" not in gain  # the curve's unadapted point pairs with the table
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "learning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stamp = (fold / "erm" / "metrics.json").stat().st_mtime_ns
    second = study(out, tmp_path / "data", arms=("erm", "fomaml"))  # finished runs are not redone
    assert second.returncode == 0 and second.stdout.count("done before") == 2
    assert (fold / "erm" / "metrics.json").stat().st_mtime_ns == stamp


def test_staged_arms_are_skipped_when_their_erm_run_fails(tmp_path):
    result = study(tmp_path / "study", tmp_path / "missing", arms=("erm", "anil"))  # no data there
    assert result.returncode == 1
    assert "retina_chasedb1/erm: FAILED" in result.stdout
    assert "retina_chasedb1/anil: skipped" in result.stdout
    assert not (tmp_path / "study" / "retina_chasedb1" / "anil").exists()
