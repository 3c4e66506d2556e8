"""metaseg-report on hand-made run folders: sorted by the named metric either way, unfinished runs
last, the mode from the runs, its errors; the search configs compose. A real sweep and the
command: tests/integration/test_sweep.py."""

import csv
import json
import math

import pytest
import yaml

from metaseg.report import report
from metaseg.utils.errors import MetasegError
from tests.helpers import compose_cfg


def _is_png(path):
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


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


def test_report_errors_name_the_fix(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MetasegError, match="no runs under"):
        report(tmp_path / "empty")
    root = tmp_path / "one"
    _fake_run(root, "0", ["a=1"], _metrics(0.3, 0.1))
    with pytest.raises(MetasegError, match="--metric 'mean.adapted_miuo' is in no run's metrics.json; "
                                           "available: mean.zero_shot_miou, mean.adapted_miou"):
        report(root, metric="mean.adapted_miuo")


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
