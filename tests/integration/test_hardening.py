"""A run folder that holds a run: a second fresh run is refused, overwrite and resume, a diverging
run keeps the good checkpoint, and the budget of a resumed run adds its sittings. Each test works
on a copy of the shared trained run (tests/integration/conftest.py)."""

import json

import pytest

from metaseg.engine.checkpoint import LOCK, load_checkpoint
from metaseg.engine.training.budget import read_budget
from metaseg.engine.training.trainer import train
from metaseg.meta.safety import DivergenceError
from metaseg.utils.errors import CheckpointError
from tests.helpers import SESSION_RUN, SESSION_STEPS, compose_cfg, copy_run

QUICK = ["trainer.eval_every=0", "eval.episodes=1", "eval.pictures=0", "eval.max_images=2", "trainer.monitor_tasks=0"]


def session(*overrides):
    """The shared run's config (what continues its checkpoint), evaluating little."""
    return compose_cfg("train", [*SESSION_RUN, *QUICK, *overrides])


def one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


def test_a_second_fresh_run_into_a_run_folder_is_refused(trained, tmp_path):
    d = copy_run(trained.run_dir, tmp_path / "run")
    before = (d / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(CheckpointError) as exc:
        train(session("trainer.max_steps=1"), d)
    text = one_line(exc)
    assert str(d) in text and "trainer.resume=auto" in text and "trainer.overwrite=true" in text
    assert (d / "checkpoints" / "last.pt").read_bytes() == before and not (d / LOCK).exists()


def test_overwrite_starts_afresh_and_resume_auto_still_continues(trained, tmp_path):
    d = copy_run(trained.run_dir, tmp_path / "run")
    (d / "tb" / "old-events").write_text("the earlier run's")
    train(session("trainer.max_steps=1", "trainer.overwrite=true"), d)
    assert not (d / "tb" / "old-events").exists() and load_checkpoint(d / "checkpoints" / "last.pt")["step"] == 1
    metrics = train(session("trainer.max_steps=2", "trainer.resume=auto"), d)
    assert metrics["step"] == 2 and not (d / LOCK).exists()
    with pytest.raises(CheckpointError, match="drop one of them"):
        train(session("trainer.max_steps=2", "trainer.resume=auto", "trainer.overwrite=true"), d)


def test_a_diverging_run_stops_before_it_replaces_a_good_checkpoint(trained, tmp_path):
    d = copy_run(trained.run_dir, tmp_path / "run")
    good = (d / "checkpoints" / "last.pt").read_bytes()
    resume = [f"trainer.max_steps={SESSION_STEPS + 2}", "trainer.ckpt_every=1", "trainer.resume=auto",
              "trainer.resume_strict=false"]
    with pytest.raises(DivergenceError) as exc:
        train(session(*resume, "meta.outer_lr=1e30"), d)
    assert "meta.outer_lr (now 1e+30)" in one_line(exc)
    with pytest.raises(DivergenceError) as exc:
        train(session(*resume, "meta.inner_lr=1e6"), d)
    assert "meta.inner_lr (now 1e+06)" in one_line(exc)
    assert (d / "checkpoints" / "last.pt").read_bytes() == good


def test_budget_seconds_add_up_over_sittings(trained, tmp_path):
    d = copy_run(trained.run_dir, tmp_path / "run")
    first = read_budget(d)["total"]["seconds"]
    train(session(f"trainer.max_steps={SESSION_STEPS + 1}", "trainer.resume=auto"), d)
    timing = json.loads((d / "timing.json").read_text())
    # this sitting's time plus the first one's up to its last checkpoint (not just this sitting's)
    assert read_budget(d)["total"]["seconds"] >= timing["seconds"] + 0.5 * first
