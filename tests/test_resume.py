"""Exact resume: a run SIGKILLed mid-way and resumed ends where an uninterrupted run ends."""

import json
import shutil
import signal

import pytest
import torch

from metaseg import __version__
from metaseg.engine.checkpoint import load_checkpoint, save_checkpoint
from metaseg.engine.state import TEST_KILL_ENV
from metaseg.engine.training.trainer import train
from metaseg.utils.errors import CheckpointError
from tests.conftest import run_cli

# 5 steps, a checkpoint every 2 and an evaluation every 2 (so best.pt, evaluation and RNG
# isolation are all exercised); the killed run dies after step 3, one step past its checkpoint.
RUN = ["experiment=smoke", "trainer.device=cpu", "trainer.threads=1", "trainer.max_steps=5",
       "trainer.ckpt_every=2", "trainer.eval_every=2", "eval.episodes=1", "eval.pictures=1"]


def _scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_sigkill_then_resume_auto_gives_the_uninterrupted_weights(tiny_cfg, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    threads = torch.get_num_threads()
    try:  # the uninterrupted run in-process (same thread count as the CLI runs: trainer.threads=1)
        train(tiny_cfg(*RUN), whole)
    finally:
        torch.set_num_threads(threads)

    out = run_cli("metaseg-train", *RUN, f"hydra.run.dir={killed}", cwd=tmp_path, env={TEST_KILL_ENV: "3"})
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    assert load_checkpoint(killed / "checkpoints" / "last.pt")["step"] == 2
    assert not (killed / "metrics.json").exists()

    out = run_cli("metaseg-train", *RUN, "trainer.resume=auto", f"hydra.run.dir={killed}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in (killed / "train.log").read_text()

    a = load_checkpoint(whole / "checkpoints" / "last.pt")
    b = load_checkpoint(killed / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 5
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
    assert _scalars(killed, "train/outer_loss") == _scalars(whole, "train/outer_loss")
    assert [s for s, _ in _scalars(killed, "train/outer_loss")] == [1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A finished 2-step run (in-process) whose last.pt the tests below resume from."""
    from tests.conftest import TINY, compose_cfg
    root = tmp_path_factory.mktemp("resume")
    cfg = compose_cfg("train", [*TINY, "trainer.device=cpu", "trainer.max_steps=2", "trainer.eval_every=0",
                                "eval.episodes=1", "eval.pictures=0"])
    train(cfg, root / "run")
    return root / "run"


def _copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_extending_a_finished_run_equals_training_longer(tiny_cfg, two_steps, tmp_path):
    common = ("trainer.max_steps=4", "trainer.eval_every=0", "eval.episodes=1", "eval.pictures=0")
    run = _copy_run(two_steps, tmp_path / "extended")
    extended = train(tiny_cfg(*common, "trainer.resume=auto"), run)
    longer = train(tiny_cfg(*common), tmp_path / "longer")
    assert extended["datasets"] == longer["datasets"] and extended["objective"] == longer["objective"]
    a = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "longer" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((run / "timing.json").read_text())["resumed_from_step"] == 2


def test_resume_path_may_be_a_run_folder_or_a_file_and_writes_to_the_new_run(tiny_cfg, two_steps, tmp_path):
    common = ("trainer.max_steps=2", "trainer.eval_every=0", "eval.episodes=1", "eval.pictures=0")
    m1 = train(tiny_cfg(*common, f"trainer.resume={two_steps}"), tmp_path / "a")
    m2 = train(tiny_cfg(*common, f"trainer.resume={two_steps / 'checkpoints' / 'last.pt'}"), tmp_path / "b")
    original = json.loads((two_steps / "metrics.json").read_text())
    assert m1["datasets"] == m2["datasets"] == original["datasets"]
    assert (tmp_path / "a" / "checkpoints" / "last.pt").is_file()


def test_auto_without_a_checkpoint_starts_fresh(tiny_cfg, tmp_path):
    m = train(tiny_cfg("trainer.max_steps=1", "trainer.eval_every=0", "eval.episodes=1", "eval.pictures=0",
                       "trainer.monitor_tasks=0", "trainer.resume=auto"), tmp_path / "fresh")
    assert m["step"] == 1
    assert json.loads((tmp_path / "fresh" / "timing.json").read_text())["resumed_from_step"] == 0


def test_a_different_config_is_refused_naming_the_keys(tiny_cfg, two_steps, tmp_path):
    cfg = tiny_cfg("trainer.max_steps=4", "meta.inner_lr=0.01", "model.norm=group", f"trainer.resume={two_steps}")
    with pytest.raises(CheckpointError) as info:
        train(cfg, tmp_path / "x")
    msg = str(info.value)
    assert "meta.inner_lr=0.1 in the checkpoint, 0.01 now" in msg
    assert "model.norm='batch' in the checkpoint, 'group' now" in msg
    assert "trainer.max_steps" not in msg  # allowed to change
    assert "trainer.resume_strict=false" in msg and "\n" not in msg
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_a_different_version_is_refused_unless_not_strict(tiny_cfg, two_steps, tmp_path):
    ckpt = load_checkpoint(two_steps / "checkpoints" / "last.pt")
    old = {k: v for k, v in ckpt.items() if k not in ("format", "version")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("metaseg.engine.checkpoint.__version__", "0.0.1")
        save_checkpoint(tmp_path / "old.pt", **old)
    assert load_checkpoint(tmp_path / "old.pt")["version"] == "0.0.1"
    common = ("trainer.max_steps=3", "trainer.eval_every=0", "eval.episodes=1", "eval.pictures=0")
    with pytest.raises(CheckpointError, match=f"written by metaseg 0.0.1, this is {__version__}"):
        train(tiny_cfg(*common, f"trainer.resume={tmp_path / 'old.pt'}"), tmp_path / "x")
    m = train(tiny_cfg(*common, f"trainer.resume={tmp_path / 'old.pt'}", "trainer.resume_strict=false"),
              tmp_path / "y")
    assert m["step"] == 3


def test_a_checkpoint_past_max_steps_or_missing_is_a_clear_error(tiny_cfg, two_steps, tmp_path):
    with pytest.raises(CheckpointError, match="at step 2, beyond trainer.max_steps=1; raise trainer.max_steps"):
        train(tiny_cfg("trainer.max_steps=1", f"trainer.resume={two_steps}"), tmp_path / "x")
    with pytest.raises(CheckpointError, match="does not exist"):
        train(tiny_cfg(f"trainer.resume={tmp_path / 'nope.pt'}"), tmp_path / "y")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="folder without checkpoints/last.pt"):
        train(tiny_cfg(f"trainer.resume={tmp_path / 'empty'}"), tmp_path / "z")


def test_a_checkpoint_without_training_state_is_refused(tiny_cfg, two_steps, tmp_path):
    ckpt = load_checkpoint(two_steps / "checkpoints" / "last.pt")
    save_checkpoint(tmp_path / "weights_only.pt", model=ckpt["model"], config=ckpt["config"], step=2)
    with pytest.raises(CheckpointError,
                       match=r"lacks \['meta_state', 'optimizer', 'scaler', 'sampler', 'best', 'budget', 'rng'\]"):
        train(tiny_cfg("trainer.max_steps=3", f"trainer.resume={tmp_path / 'weights_only.pt'}"), tmp_path / "x")
