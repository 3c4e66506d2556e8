"""The entry points in-process: what they decide before Hydra starts (metaseg-eval's data keys with
a checkpoint, metaseg-train's occupied run folder), a user error inside their Hydra task as one
``PROG: error: ...`` line and exit status 2 (metaseg-eval's missing checkpoint, metaseg-data's bad
data, metaseg-predict without out=), a typo in a key as Hydra reports it (metaseg-train's main),
metaseg-report's error printed once, and metaseg-eval's refusal of a file that runs code.
metaseg-train's user error through Hydra in a process of its own: tests/integration/test_config.py."""

import logging
import sys

import pytest
import torch
from hydra import compose, initialize_config_module

import metaseg.data_cli
import metaseg.eval
import metaseg.predict_cli
import metaseg.report
import metaseg.train
from metaseg.engine.evaluation.checkpoint_eval import evaluate_checkpoint
from metaseg.utils.errors import CheckpointError
from tests.helpers import compose_cfg, folder_dataset, hydra_task, image_folder


def _main(module, monkeypatch, capsys, *argv) -> str:
    """``module.main()`` as its console script runs it with ``argv``: the exit code 2 and the one stderr line."""
    monkeypatch.setattr(sys, "argv", [module.__name__, *argv])
    with pytest.raises(SystemExit) as exc:
        module.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    return err


def test_eval_data_keys_with_a_checkpoint_say_what_to_pass(monkeypatch, capsys, tmp_path):
    ckpt = f"checkpoint={tmp_path / 'D' / 'checkpoints' / 'last.pt'}"
    err = _main(metaseg.eval, monkeypatch, capsys, ckpt, "data.root=/elsewhere", f"hydra.run.dir={tmp_path / 'E2'}")
    assert "pass data_root=/elsewhere" in err
    err = _main(metaseg.eval, monkeypatch, capsys, ckpt, "data.size=64", f"hydra.run.dir={tmp_path / 'E2'}")
    assert "pass data=NAME" in err
    assert not (tmp_path / "E2").exists()  # Hydra never started


def test_train_refuses_an_occupied_run_dir_before_hydra_touches_it(monkeypatch, capsys, tmp_path):
    """A fresh metaseg-train into a finished run's folder stops before Hydra rewrites its .hydra/ and log."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("the earlier run's\n")
    (run / "metrics.json").write_text("{}\n")
    err = _main(metaseg.train, monkeypatch, capsys, "experiment=smoke", "trainer.device=cpu", f"hydra.run.dir={run}")
    assert err.startswith("metaseg-train: error: ")
    assert "already holds a finished run (metrics.json)" in err and "trainer.resume=auto" in err
    assert (run / ".hydra" / "config.yaml").read_text() == "the earlier run's\n"  # untouched
    assert not (run / "train.log").exists()


def test_eval_refuses_a_checkpoint_that_runs_code(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"model": {}, "config": {}, "format": 1, "x": Evil()}, tmp_path / "evil.pt")
    capsys.readouterr()
    with pytest.raises(CheckpointError, match="cannot be loaded as plain data"):
        evaluate_checkpoint(compose_cfg("eval", [f"checkpoint={tmp_path / 'evil.pt'}", "device=cpu"]), tmp_path / "E")
    assert "pwned" not in capsys.readouterr().out
    assert not (tmp_path / "E" / "eval.json").exists()


def _task_error(task, config_name, overrides, output_dir, capsys) -> str:
    """The Hydra task of a command stopping on a user error: exit status 2, one stderr line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        hydra_task(task, config_name, overrides, output_dir)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    return err


def test_eval_missing_checkpoint_is_one_line(tmp_path, capsys):
    err = _task_error(metaseg.eval._main, "eval", ["checkpoint=nope/last.pt"], tmp_path / "E", capsys)
    assert err.startswith("metaseg-eval: error: ") and "checkpoint='nope/last.pt' does not exist" in err
    assert not (tmp_path / "E" / "eval.json").exists()


def test_bad_data_stops_metaseg_data_with_one_line(tmp_path, capsys):
    folder_dataset(tmp_path / "d", n=3)
    (tmp_path / "d" / "masks" / "img0.png").unlink()
    err = _task_error(metaseg.data_cli.main, "data_cmd", ["data=folder", f"data.root={tmp_path / 'd'}"],
                      tmp_path / "r", capsys)
    assert err.startswith("metaseg-data: error: ") and "1 image(s) have no mask" in err and "img0.png" in err
    assert not (tmp_path / "r" / "summary.json").exists()


def test_predict_without_out_names_the_key_on_one_line(tmp_path, capsys):
    images = image_folder(tmp_path / "images", bad=False)
    args = ["checkpoint=none", f"images={images}", "device=cpu"]
    with initialize_config_module(config_module="metaseg.conf", version_base="1.3"):
        hydra_cfg = compose("predict", args, return_hydra_config=True).hydra
    assert hydra_cfg.run.dir.startswith("outputs/predict/")  # no out=: Hydra's run folder falls back, Hydra starts
    err = _task_error(metaseg.predict_cli.main, "predict", args, tmp_path / "run", capsys)
    assert err.strip() == (
        "metaseg-predict: error: out is not set: give out=... (the folder to write masks/ and overlays/ to)")


def test_report_prints_its_error_once(tmp_path, capsys, monkeypatch):
    """As the installed command runs: no logging configured, so the error is printed, not also logged
    (Python's last-resort handler would print it a second time)."""
    monkeypatch.setattr(logging.root, "handlers", [])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        metaseg.report.main([str(tmp_path / "nope")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("is not a folder") == 1, err
    assert f"metaseg-report: error: {tmp_path / 'nope'} is not a folder" in err and "Traceback" not in err


def test_train_typo_is_one_clear_line_before_any_work(tmp_path, monkeypatch, capsys):
    """``metaseg-train meta.inner_lrr=0.1``: Hydra stops composing (no run folder, no logging set up yet)
    and prints its error without a traceback (HYDRA_FULL_ERROR unset)."""
    from hydra.core.global_hydra import GlobalHydra

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", ["metaseg-train", "meta.inner_lrr=0.1", f"hydra.run.dir={tmp_path / 'run'}"])
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as exc:
            metaseg.train.main()
    finally:
        GlobalHydra.instance().clear()
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert "inner_lrr" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
