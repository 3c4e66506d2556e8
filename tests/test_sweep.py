"""Sweeps: a Hydra multirun at tiny sizes, then metaseg-report's sorted table, CSV and plot."""

import csv
import json
import math

import pytest
import yaml

from metaseg.report import report
from tests.conftest import compose_cfg, run_cli

TINY_RUN = ["experiment=smoke", "trainer.device=cpu", "trainer.max_steps=1", "trainer.eval_every=0",
            "eval.episodes=1", "eval.pictures=0", "trainer.monitor_tasks=0",
            "trainer.best_metric=mean.adapted_miou"]  # these tests check the sweep mechanics on held-out means


def _is_png(path):
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """``metaseg-train -m`` over a 2 x 2 grid of alpha and K: four runs, each in its own folder."""
    root = tmp_path_factory.mktemp("sweep")
    out = run_cli("metaseg-train", "-m", "meta.inner_lr=0.1,0.01", "meta.inner_steps=1,2", *TINY_RUN,
                  f"hydra.sweep.dir={root / 'grid'}", cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "grid"


def test_multirun_runs_every_point_in_its_own_folder(grid):
    seen = set()
    for job in range(4):
        d = grid / str(job)
        overrides = yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text())
        point = tuple(o for o in overrides if o.startswith(("meta.inner_lr=", "meta.inner_steps=")))
        seen.add(point)
        metrics = json.loads((d / "metrics.json").read_text())
        config = yaml.safe_load((d / ".hydra" / "config.yaml").read_text())
        assert metrics["datasets"]["synth_4"]["adapted"]["adapt_steps"] == config["meta"]["inner_steps"]
        assert (d / "checkpoints" / "last.pt").is_file() and (d / "train.log").is_file()
        assert metrics["objective"] == metrics["mean"]["adapted_miou"]  # what the sweeper gets
    assert seen == {(f"meta.inner_lr={a}", f"meta.inner_steps={k}") for a in ("0.1", "0.01") for k in (1, 2)}


def test_report_cli_prints_and_writes_a_sorted_table(grid, tmp_path):
    out = run_cli("metaseg-report", str(grid), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    truth = {str(j): json.loads((grid / str(j) / "metrics.json").read_text())["mean"]["adapted_miou"]
             for j in range(4)}
    with open(grid / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == sorted(truth, key=truth.get, reverse=True)
    assert [float(r["mean.adapted_miou"]) for r in rows] == sorted(truth.values(), reverse=True)
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    for r in rows:
        overrides = yaml.safe_load((grid / r["run"] / ".hydra" / "overrides.yaml").read_text())
        assert f"meta.inner_lr={r['meta.inner_lr']}" in overrides
        assert f"meta.inner_steps={r['meta.inner_steps']}" in overrides
    assert "experiment" not in rows[0]  # the same in every run: not a swept column
    md = (grid / "report.md").read_text()
    assert "| rank | run | meta.inner_lr | meta.inner_steps | mean.adapted_miou |" in md
    assert md.splitlines()[6].startswith(f"| 1 | {rows[0]['run']} |")
    assert "| rank | run |" in out.stdout and "report.png" in out.stdout  # printed too
    assert _is_png(grid / "report.png")


def _fake_run(root, name, overrides, metrics=None, best_metric="mean.adapted_miou", best_mode="max"):
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (d / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump({"trainer": {"best_metric": best_metric, "best_mode": best_mode}}))
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
    return d


def _metrics(adapted, zero, loss=None):
    m = {"mean": {"zero_shot_miou": zero, "adapted_miou": adapted}, "objective": adapted,
         "best": {"metric": "mean.adapted_miou", "value": adapted, "step": 3}}
    if loss is not None:
        m["val"] = {"loss": loss}
    return m


def test_report_sorts_by_the_named_metric_either_way_and_lists_unfinished_runs_last(tmp_path):
    root = tmp_path / "multi"
    _fake_run(root, "0", ["meta.inner_lr=0.1", "meta.first_order=true", "seed=0"], _metrics(0.30, 0.10, 2.0))
    _fake_run(root, "1", ["meta.inner_lr=0.01", "meta.first_order=true", "seed=0"], _metrics(0.50, 0.05, 1.0))
    _fake_run(root, "2", ["meta.inner_lr=0.001", "meta.first_order=false", "seed=0"], _metrics(0.40, 0.20, 3.0))
    _fake_run(root, "10", ["meta.inner_lr=1.0", "meta.first_order=false", "seed=0"])  # crashed: no metrics
    result = report(root)
    assert result["metric"] == "mean.adapted_miou" and result["mode"] == "max"  # from the runs' config
    assert [r.name for r in result["runs"]] == ["1", "2", "0", "10"]
    assert result["runs"][-1].status == "incomplete"
    with open(root / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:4] == ["rank", "run", "meta.inner_lr", "meta.first_order"]  # seed is not swept
    assert rows[-1]["rank"] == "" and rows[-1]["mean.adapted_miou"] == "" and rows[-1]["status"] == "incomplete"
    assert float(rows[0]["mean.zero_shot_miou"]) == 0.05

    by_loss = report(root, metric="val.loss", mode="min", out=tmp_path / "elsewhere")
    assert [r.name for r in by_loss["runs"]] == ["1", "0", "2", "10"]
    assert (tmp_path / "elsewhere" / "report.md").is_file() and _is_png(tmp_path / "elsewhere" / "report.png")
    by_zero = report(root, metric="mean.zero_shot_miou")
    assert [r.name for r in by_zero["runs"]][:3] == ["2", "0", "1"]
    assert math.isclose(by_zero["runs"][0].value, 0.20)


def test_report_reads_the_mode_from_the_runs(tmp_path):
    root = tmp_path / "m"
    _fake_run(root, "0", ["a=1"], {"val": {"loss": 2.0}}, best_metric="val.loss", best_mode="min")
    _fake_run(root, "1", ["a=2"], {"val": {"loss": 1.0}}, best_metric="val.loss", best_mode="min")
    result = report(root)
    assert (result["metric"], result["mode"]) == ("val.loss", "min")
    assert [r.name for r in result["runs"]] == ["1", "0"]


def test_report_errors_are_one_line_with_exit_2(tmp_path):
    from metaseg.utils.errors import MetasegError
    out = run_cli("metaseg-report", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"metaseg-report: error: {tmp_path / 'nowhere'} is not a folder" in out.stderr
    (tmp_path / "empty").mkdir()
    with pytest.raises(MetasegError, match="no runs under"):
        report(tmp_path / "empty")
    root = tmp_path / "one"
    _fake_run(root, "0", ["a=1"], _metrics(0.3, 0.1))
    with pytest.raises(MetasegError, match="--metric 'mean.adapted_miuo' is in no run's metrics.json; "
                                           "available: mean.zero_shot_miou, mean.adapted_miou"):
        report(root, metric="mean.adapted_miuo")


def test_train_returns_the_objective_to_the_sweeper(tmp_path):
    """``metaseg.train.hydra_main`` (what Hydra's sweepers call) returns the configured metric."""
    from hydra import compose, initialize_config_module
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import metaseg.train
    with initialize_config_module(config_module="metaseg.conf", version_base="1.3"):
        cfg = compose("train", TINY_RUN + ["trainer.best_metric=mean.zero_shot_miou"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
    HydraConfig.instance().set_config(cfg)  # what @hydra.main sets up before calling main
    with open_dict(cfg):
        del cfg["hydra"]
    try:
        value = metaseg.train.hydra_main.__wrapped__(cfg)
    finally:
        HydraConfig.instance().cfg = None
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert value == metrics["objective"] == metrics["mean"]["zero_shot_miou"]


def test_optuna_search_config_composes():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="optional extra metaseg-learn[optuna]")
    from hydra import compose, initialize_config_module
    with initialize_config_module(config_module="metaseg.conf", version_base="1.3"):
        cfg = compose("train", ["hparams_search=optuna", "experiment=smoke"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert set(sweeper.params) == {"meta.inner_lr", "meta.outer_lr", "meta.inner_steps"}
    assert sweeper.direction == "maximize" and cfg.trainer.best_mode == "max"


def test_hparams_search_slot_is_empty_by_default():
    cfg = compose_cfg("train", ["experiment=smoke"])
    assert "hparams_search" not in cfg


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
