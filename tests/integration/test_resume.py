"""Exact resume: a run SIGKILLed mid-way and resumed ends where an uninterrupted run ends.

The uninterrupted run is the shared one (tests/integration/conftest.py): 4 steps, a checkpoint
and an evaluation every 2 (so best.pt, evaluation and RNG isolation are all exercised); the
killed run dies after step 3, one step past its checkpoint. The other tests
continue or refuse the shared run's checkpoint, composing its config (SESSION_RUN).
"""

import json
import logging
import signal

import pytest
import torch

from metaseg import __version__
from metaseg.engine.checkpoint import load_checkpoint, save_checkpoint
from metaseg.engine.state import TEST_KILL_ENV
from metaseg.engine.training.trainer import train
from metaseg.utils.errors import CheckpointError
from tests.helpers import SESSION_RUN, SESSION_STEPS, compose_cfg, copy_run, run_cli, scalars

# the evaluation at the end of a continued run, small (eval.*: free to change on resume)
QUICK_EVAL = ("trainer.eval_every=0", "eval.episodes=1", "eval.pictures=0", "eval.max_images=2")


def session(*overrides):
    """The shared run's config with ``overrides``: what continues its checkpoint."""
    return compose_cfg("train", [*SESSION_RUN, *overrides])


def test_sigkill_then_resume_auto_gives_the_uninterrupted_weights(trained, tmp_path, caplog):
    whole, killed = trained.run_dir, tmp_path / "killed"
    out = run_cli("metaseg-train", *SESSION_RUN, f"hydra.run.dir={killed}", cwd=tmp_path, env={TEST_KILL_ENV: "3"},
                  baseline=True)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    assert load_checkpoint(killed / "checkpoints" / "last.pt")["step"] == 2
    assert not (killed / "metrics.json").exists()

    # metaseg-train trainer.resume=auto hydra.run.dir=KILLED, its engine in-process (the baseline on, as typed)
    caplog.set_level(logging.INFO, logger="metaseg")
    train(session("trainer.resume=auto", "eval.baseline=true"), killed)
    assert "resumed from" in caplog.text

    a = load_checkpoint(whole / "checkpoints" / "last.pt")
    b = load_checkpoint(killed / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == SESSION_STEPS
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert a["sampler"] == b["sampler"] and a["best"] == b["best"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    # metrics.json holds nothing run-dependent: byte-identical
    assert (whole / "metrics.json").read_bytes() == (killed / "metrics.json").read_bytes()
    best_a = load_checkpoint(whole / "checkpoints" / "best.pt")
    best_b = load_checkpoint(killed / "checkpoints" / "best.pt")
    assert best_a["step"] == best_b["step"]
    assert all(torch.equal(best_a["model"][k], best_b["model"][k]) for k in best_a["model"])
    # tensorboard: the steps the killed run logged after its checkpoint were purged, not doubled
    assert scalars(killed, "train/outer_loss") == scalars(whole, "train/outer_loss")
    assert [s for s, _ in scalars(killed, "train/outer_loss")] == [1, 2, 3, 4]


def test_extending_a_finished_run_equals_training_longer(trained, tmp_path):
    longer_steps = f"trainer.max_steps={SESSION_STEPS + 1}"
    run = copy_run(trained.run_dir, tmp_path / "extended")
    extended = train(session(longer_steps, *QUICK_EVAL, "trainer.resume=auto"), run)
    longer = train(session(longer_steps, *QUICK_EVAL), tmp_path / "longer")
    assert extended["datasets"] == longer["datasets"] and extended["objective"] == longer["objective"]
    a = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "longer" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((run / "timing.json").read_text())["resumed_from_step"] == SESSION_STEPS


def test_resume_path_may_be_a_run_folder_or_a_file_and_writes_to_the_new_run(trained, tmp_path):
    every_image = ("trainer.eval_every=0", "eval.episodes=1", "eval.pictures=0")  # zero-shot: as the shared run
    m1 = train(session(*every_image, f"trainer.resume={trained.run_dir}"), tmp_path / "a")
    m2 = train(session(*every_image, f"trainer.resume={trained.last}"), tmp_path / "b")
    assert m1["datasets"] == m2["datasets"]
    original = json.loads((trained.run_dir / "metrics.json").read_text())["datasets"]
    zero_shot = lambda datasets: {n: d["zero_shot"] for n, d in datasets.items()}  # noqa: E731 - the weights' own
    assert zero_shot(m1["datasets"]) == zero_shot(original)  # the checkpoint's weights, scored again
    assert (tmp_path / "a" / "checkpoints" / "last.pt").is_file()


def test_auto_without_a_checkpoint_starts_fresh(tiny_cfg, tmp_path):
    m = train(tiny_cfg("trainer.max_steps=1", "trainer.eval_every=0", "eval.episodes=0", "eval.pictures=0",
                       "trainer.best_metric=val.mean.zero_shot_miou", "trainer.monitor_tasks=0",
                       "trainer.resume=auto"), tmp_path / "fresh")
    assert m["step"] == 1
    assert json.loads((tmp_path / "fresh" / "timing.json").read_text())["resumed_from_step"] == 0


def test_a_different_config_is_refused_naming_the_keys(trained, tmp_path):
    cfg = session("trainer.max_steps=6", "meta.inner_lr=0.01", "model.norm=group", f"trainer.resume={trained.run_dir}")
    with pytest.raises(CheckpointError) as info:
        train(cfg, tmp_path / "x")
    msg = str(info.value)
    assert "meta.inner_lr=0.05 in the checkpoint, 0.01 now" in msg
    assert "model.norm='batch' in the checkpoint, 'group' now" in msg
    assert "trainer.max_steps" not in msg  # allowed to change
    assert "trainer.resume_strict=false" in msg and "\n" not in msg
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_a_different_version_is_refused_unless_not_strict(trained, tmp_path):
    ckpt = load_checkpoint(trained.last)
    old = {k: v for k, v in ckpt.items() if k not in ("format", "version")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("metaseg.engine.checkpoint.__version__", "0.0.1")
        save_checkpoint(tmp_path / "old.pt", **old)
    assert load_checkpoint(tmp_path / "old.pt")["version"] == "0.0.1"
    common = (f"trainer.max_steps={SESSION_STEPS + 1}", *QUICK_EVAL)
    with pytest.raises(CheckpointError, match=f"written by metaseg 0.0.1, this is {__version__}"):
        train(session(*common, f"trainer.resume={tmp_path / 'old.pt'}"), tmp_path / "x")
    m = train(session(*common, f"trainer.resume={tmp_path / 'old.pt'}", "trainer.resume_strict=false"),
              tmp_path / "y")
    assert m["step"] == SESSION_STEPS + 1


def test_a_checkpoint_past_max_steps_or_missing_is_a_clear_error(trained, tiny_cfg, tmp_path):
    with pytest.raises(CheckpointError, match=f"at step {SESSION_STEPS}, beyond trainer.max_steps=1; "
                                              "raise trainer.max_steps"):
        train(session("trainer.max_steps=1", f"trainer.resume={trained.run_dir}"), tmp_path / "x")
    with pytest.raises(CheckpointError, match="does not exist"):
        train(tiny_cfg(f"trainer.resume={tmp_path / 'nope.pt'}"), tmp_path / "y")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="folder without checkpoints/last.pt"):
        train(tiny_cfg(f"trainer.resume={tmp_path / 'empty'}"), tmp_path / "z")


def test_a_checkpoint_without_training_state_is_refused(trained, tmp_path):
    ckpt = load_checkpoint(trained.last)
    save_checkpoint(tmp_path / "weights_only.pt", model=ckpt["model"], config=ckpt["config"], step=SESSION_STEPS)
    with pytest.raises(CheckpointError,
                       match=r"lacks \['meta_state', 'optimizer', 'scaler', 'sampler', 'best', 'budget', 'rng'\]"):
        train(session("trainer.max_steps=5", f"trainer.resume={tmp_path / 'weights_only.pt'}"), tmp_path / "x")
