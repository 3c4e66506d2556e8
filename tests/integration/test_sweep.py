"""Sweeps: a Hydra multirun at tiny sizes, then metaseg-report's sorted table, CSV and plot; the
objective metaseg-train hands a sweeper. metaseg-report on hand-made run folders and the search
configs: tests/unit/test_sweep.py; its error printed once: tests/unit/test_commands.py."""

import csv
import json
import math

import pytest
import yaml

from metaseg.report import report
from tests.helpers import hydra_task, run_cli

TINY_RUN = ["experiment=smoke", "trainer.device=cpu", "trainer.max_steps=1", "trainer.eval_every=0",
            "eval.episodes=1", "eval.pictures=0", "trainer.monitor_tasks=0",
            "trainer.best_metric=mean.adapted_miou"]  # these tests check the sweep mechanics on held-out means


def _is_png(path):
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """``metaseg-train -m`` over two values of K: two runs, each in its own folder (a grid of several keys,
    Hydra's product, and a report with several swept columns: tests/unit/test_sweep.py on hand-made runs)."""
    root = tmp_path_factory.mktemp("sweep")
    out = run_cli("metaseg-train", "-m", "meta.inner_steps=1,2", *TINY_RUN,
                  f"hydra.sweep.dir={root / 'grid'}", cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "grid"


def test_multirun_runs_every_point_in_its_own_folder(grid):
    seen = set()
    for job in range(2):
        d = grid / str(job)
        overrides = yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text())
        point = tuple(o for o in overrides if o.startswith("meta.inner_steps="))
        seen.add(point)
        metrics = json.loads((d / "metrics.json").read_text())
        config = yaml.safe_load((d / ".hydra" / "config.yaml").read_text())
        assert metrics["datasets"]["synth_4"]["adapted"]["adapt_steps"] == config["meta"]["inner_steps"]
        assert (d / "checkpoints" / "last.pt").is_file() and (d / "train.log").is_file()
        assert metrics["objective"] == metrics["mean"]["adapted_miou"]  # what the sweeper gets
    assert seen == {(f"meta.inner_steps={k}",) for k in (1, 2)} and not (grid / "2").exists()


def test_report_cli_prints_and_writes_a_sorted_table(grid, tmp_path):
    out = run_cli("metaseg-report", str(grid), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    truth = {str(j): json.loads((grid / str(j) / "metrics.json").read_text())["mean"]["adapted_miou"]
             for j in range(2)}
    with open(grid / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == sorted(truth, key=truth.get, reverse=True)
    assert [float(r["mean.adapted_miou"]) for r in rows] == sorted(truth.values(), reverse=True)
    assert [r["rank"] for r in rows] == ["1", "2"]
    for r in rows:
        overrides = yaml.safe_load((grid / r["run"] / ".hydra" / "overrides.yaml").read_text())
        assert f"meta.inner_steps={r['meta.inner_steps']}" in overrides
    assert "experiment" not in rows[0] and "meta.inner_lr" not in rows[0]  # the same in every run: not swept
    md = (grid / "report.md").read_text()
    assert "| rank | run | meta.inner_steps | mean.adapted_miou |" in md
    assert md.splitlines()[6].startswith(f"| 1 | {rows[0]['run']} |")
    assert "| rank | run |" in out.stdout and "report.png" in out.stdout  # printed too
    assert _is_png(grid / "report.png")


def test_train_returns_the_objective_to_the_sweeper(tmp_path):
    """``metaseg.train.hydra_main`` (what Hydra's sweepers call) returns the configured metric."""
    import metaseg.train

    value = hydra_task(metaseg.train.hydra_main, "train", TINY_RUN + ["trainer.best_metric=mean.zero_shot_miou"],
                       tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert value == metrics["objective"] == metrics["mean"]["zero_shot_miou"]


@pytest.mark.slow
def test_optuna_search_runs_and_reports(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="optional extra metaseg-learn[optuna]")
    out = run_cli("metaseg-train", "hparams_search=optuna", *TINY_RUN, "hydra.sweeper.n_trials=2",
                  f"hydra.sweep.dir={tmp_path / 'opt'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    best = yaml.safe_load((tmp_path / "opt" / "optimization_results.yaml").read_text())
    values = [json.loads((tmp_path / "opt" / str(j) / "metrics.json").read_text())["objective"] for j in (0, 1)]
    assert math.isclose(best["best_value"], max(values))
    result = report(tmp_path / "opt")
    assert math.isclose(result["runs"][0].value, max(values))
