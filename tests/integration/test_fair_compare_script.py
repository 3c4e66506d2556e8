"""scripts/fair_compare.py: the arms' table, both budget views, resumable study folders.

Tiny sizes (2 outer steps, 32 px, 2 + 2 images per task, one episode), passed through the
script's ``--override``. That validation images never reach training tasks or held-out scores is
tested image by image in tests/unit/test_fair_validation.py
(``test_validation_images_never_appear_in_training_tasks_or_heldout``); here, that every arm's
tuning ran on the training domains' validation tasks and its held-out scores on the held-out
domains only, with the chosen setting.

Slow: the study trains and tunes three arms and times two of them side by side (~40 s on two idle
cores); its parts (budgets, tuning, init_from, validation tasks) are in the default suite. The
script's arithmetic (step budgets, the cost measurement's order) and its refusal of a typo:
tests/unit/test_fair_compare_script.py.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import FAIR_COMPARE_TINY as TINY
from tests.helpers import ROOT, load_script

fc = load_script("fair_compare")
pytestmark = pytest.mark.slow

TRAIN_DOMAINS, HELDOUT = ["synth_0", "synth_1", "synth_2", "synth_3"], ["synth_4", "synth_5"]


def _json(path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("fair")
    args = [*TINY, "--out", str(out), "--arms", "maml", "erm", "scratch"]
    assert fc.main(args) == 0
    return out, args


def _rows(out):
    return {r["arm"]: r for r in _json(out / "table.json")["rows"]}


def test_table_has_every_arm_row_with_budget_columns_from_budget_json(study):
    out, _ = study
    rows = _rows(out)
    assert {"maml", "erm", "erm@time", "scratch"} == set(rows)
    table = (out / "table.md").read_text()
    for name, r in rows.items():
        assert f"| {name} | {r['outer_steps']} | {r['forward_images']} | {r['backward_images']} |" in table
        if name == "scratch":
            assert r["outer_steps"] == r["forward_images"] == 0
            continue
        total = _json(out / name.replace("@", "_at_") / "budget.json")["total"]
        assert (r["outer_steps"], r["forward_images"], r["backward_images"]) == \
            (total["outer_steps"], total["forward_images"], total["backward_images"]) and r["forward_images"] > 0
        assert r["train_s"] == pytest.approx(total["train_seconds"]) and r["train_s"] > 0
    # equal images processed: erm makes maml's forward passes per step; second order sends the
    # support batches back twice: 2 tasks x (2 x 2 support + 2 query) per step, plus 2 x 2 support
    assert rows["maml"]["outer_steps"] == rows["erm"]["outer_steps"] == 2
    assert rows["erm"]["forward_images"] == rows["maml"]["forward_images"]
    assert rows["maml"]["backward_images"] - rows["erm"]["backward_images"] == 2 * 2 * (2 * 2)


def test_time_arm_gets_the_steps_that_fit_in_maml_time(study):
    out, _ = study
    rows = _rows(out)
    costs = _json(out / "costs.json")
    assert set(costs["seconds"]) == {"maml", "erm"}  # measured side by side, for the arms that need them
    maml_s, erm_s = costs["seconds"]["maml"], costs["seconds"]["erm"]
    assert erm_s < maml_s  # first order with no graph through the inner loop: cheaper per step
    expect = round(2 * maml_s / erm_s)
    assert rows["erm@time"]["outer_steps"] == expect > rows["maml"]["outer_steps"]
    assert f"trainer.max_steps={expect}" in _json(out / "erm_at_time" / "arm.json")["train"]
    assert costs["overrides"]["erm"] == _json(out / "erm" / "arm.json")["train"]  # the arm's own settings
    assert "measured side by side" in (out / "table.md").read_text()


def test_tuning_on_training_domains_then_heldout_with_the_choice(study):
    out, _ = study
    for name in ("maml", "erm", "erm_at_time", "scratch"):
        ev = _json(out / name / "eval" / "eval.json")
        tune = ev["tune"]
        assert tune["datasets"] == TRAIN_DOMAINS and sorted(ev["datasets"]) == HELDOUT
        grid = {(r["adapt_lr"], r["adapt_steps"]) for r in tune["grid"]}
        assert {(0.1, 1), (0.3, 1)} <= grid  # the same grid, the fixed default setting in it
        assert (ev["protocol"]["adapt_lr"], ev["protocol"]["adapt_steps"]) == \
            (tune["chosen"]["adapt_lr"], tune["chosen"]["adapt_steps"])
        if name != "scratch":  # the checkpoint evaluated is best.pt, selected on validation tasks
            assert ev["checkpoint"].endswith(os.path.join(name, "checkpoints", "best.pt"))
            assert _json(out / name / "metrics.json")["best"]["metric"] == "val.mean.adapted_miou"


def test_second_invocation_reuses_finished_arms(study, caplog):
    out, args = study
    files = [out / a / f for a in ("maml", "erm", "erm_at_time") for f in ("metrics.json", "checkpoints/best.pt")]
    files += [out / a / "eval" / "eval.json" for a in ("maml", "erm", "erm_at_time", "scratch")]
    files.append(out / "costs.json")  # measured once
    before = {f: f.stat().st_mtime_ns for f in files}
    rows = _rows(out)
    assert fc.main(args) == 0
    assert {f: f.stat().st_mtime_ns for f in files} == before
    assert set(_json(out / "table.json")["outcome"].values()) == {"reused"}
    assert _rows(out) == rows
    assert any(r.getMessage().startswith("maml: finished in") for r in caplog.records)
    assert not any("training" in r.getMessage() for r in caplog.records)


def test_other_settings_stop_before_anything_runs(study, capsys):
    out, args = study
    before = (out / "maml" / "arm.json").read_text()
    assert fc.main([*args, "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "holds a run with other settings" in err and "trainer.max_steps=3" in err and "--force" in err
    assert (out / "maml" / "arm.json").read_text() == before


def test_force_redoes_only_the_named_arms(study):
    out, args = study
    maml_eval, scratch_eval = out / "maml" / "eval" / "eval.json", out / "scratch" / "eval" / "eval.json"
    m0, s0 = maml_eval.stat().st_mtime_ns, _json(scratch_eval)
    assert fc.main([*args, "--arms", "scratch", "--force"]) == 0
    assert maml_eval.stat().st_mtime_ns == m0
    s1 = _json(scratch_eval)
    assert s1["tune"] == s0["tune"] and s1["mean"] == s0["mean"]  # same seed, same numbers


def test_every_arm_in_two_worker_processes(tmp_path):
    """All seven arms and their @time runs, two at a time in worker processes (about 1-2 minutes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "fair_compare.py"), *TINY, "--out", str(tmp_path),
                           "--jobs", "2"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = _rows(tmp_path)
    assert set(fc.ARMS) <= set(rows)
    maml = rows["maml"]
    cost = _json(tmp_path / "costs.json")["seconds"]
    assert set(cost) == {"maml", "fomaml", "anil", "metasgd", "erm"}
    for arm in ("fomaml", "anil", "erm", "two_stage"):  # cheaper than second-order MAML per step
        assert rows[arm]["outer_steps"] == maml["outer_steps"]
        own = cost["erm"] + cost["maml"] if arm == "two_stage" else 2 * cost[arm]
        expect = fc.time_steps(arm, 2, 2 * cost["maml"], own)
        if expect is None:
            assert arm + "@time" not in rows
        else:
            assert rows[arm + "@time"]["outer_steps"] == sum(s or 0 for s in expect) > maml["outer_steps"]
    two = _json(tmp_path / "two_stage" / "budget.json")
    first, second = two["stages"]["pretrain"]["total"], two["this_stage"]
    assert first["outer_steps"] == second["outer_steps"] == 1
    assert two["total"]["forward_images"] == first["forward_images"] + second["forward_images"]
    assert rows["metasgd"]["chosen"]["adapt_lr"] in (None, 0.1, 0.3)  # learned step sizes compete too
