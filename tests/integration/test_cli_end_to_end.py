"""The installed commands end to end, as a user types them.

``metaseg-train`` is the shared run of tests/integration/conftest.py (SESSION_RUN at smoke size,
with the random-init baseline): what it writes, prints and logs, and the best.pt it picks.
``metaseg-eval checkpoint=D/checkpoints/last.pt hydra.run.dir=E`` runs on its checkpoint as is
(its errors, in-process: tests/unit/test_commands.py). The default job at full size is
tests/integration/test_default_job.py (slow).
"""

import json
import math

import numpy as np
import pytest
import torch

from metaseg.engine.checkpoint import load_checkpoint
from tests.helpers import SESSION_EVALS, SESSION_STEPS, run_cli

SIZE = 32  # experiment=smoke's image size
STEPS = list(range(1, SESSION_STEPS + 1))  # experiment=smoke: trainer.log_every=1


def _acc(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_train_writes_checkpoint_metrics_and_tensorboard(trained):
    d = trained.run_dir
    assert trained.last.is_file() and (d / ".hydra" / "config.yaml").is_file()
    assert list((d / "tb").glob("events.out.tfevents.*"))
    assert (d / "train.log").read_text().count(f"step {SESSION_STEPS}/{SESSION_STEPS}") == 1
    metrics = json.loads((d / "metrics.json").read_text())
    assert metrics["step"] == SESSION_STEPS
    for name in ("synth_4", "synth_5"):
        res = metrics["datasets"][name]
        assert 0 <= res["zero_shot"]["miou"] <= 1
        assert 0 <= res["adapted"]["miou"]["mean"] <= 1


def test_train_ends_with_the_summary_beside_the_random_init_baseline(trained):
    metrics = json.loads((trained.run_dir / "metrics.json").read_text())
    assert set(metrics["baseline"]["datasets"]) == {"synth_4", "synth_5"}  # eval.baseline: on by default
    summary = trained.console[trained.console.index("==== summary ===="):]
    for name in ("synth_4", "synth_5"):
        a = metrics["datasets"][name]["adapted"]["2"]["miou"]  # experiment=smoke: eval.shots=2
        b = metrics["baseline"]["datasets"][name]["adapted"]["2"]["miou"]
        row = next(line for line in summary.splitlines() if line.startswith(f"| {name} | 2-shot"))
        assert f"{100 * a['mean']:.1f} ± {100 * a['ci95']:.1f}" in row
        assert f"{100 * (a['mean'] - b['mean']):+.1f}" in row
    assert "tensorboard --logdir D  (" in summary and "metaseg-eval checkpoint=D/checkpoints/" in summary  # from cwd


def test_console_has_no_progress_bar_when_not_a_terminal(trained):
    stderr_and_stdout = trained.console
    assert "meta-train:" not in stderr_and_stdout and "it/s" not in stderr_and_stdout
    assert "s/it" not in stderr_and_stdout
    log = (trained.run_dir / "train.log").read_text()
    assert "step 1/4" in log and "step 1/4" in stderr_and_stdout  # log file and console


def test_checkpoint_is_plain_data(trained):
    ckpt = torch.load(trained.last, weights_only=True)
    assert ckpt["step"] == SESSION_STEPS
    assert isinstance(ckpt["config"], dict) and ckpt["config"]["meta"]["inner_lr"] == 0.05
    assert ckpt["config"]["meta"]["inner_steps"] == 1  # experiment=smoke's K
    assert set(ckpt) >= {"model", "optimizer", "step", "config", "version"}
    assert all(isinstance(v, torch.Tensor) for v in ckpt["model"].values())


def test_tensorboard_has_the_documented_scalars_and_diagnostics(trained):
    acc = _acc(trained.run_dir)
    tags = set(acc.Tags()["scalars"])
    assert {"train/outer_loss", "train/query_loss_before", "train/query_loss_after", "train/outer_grad_norm",
            "train/beta", "train/tasks_per_second", "monitor/query_loss_after_0_steps",
            "monitor/query_loss_after_1_steps", "heldout/synth_4/zero_shot_miou", "heldout/synth_4/adapted_miou",
            "heldout/synth_5/adapted_mf1", "val/adapted_miou"} <= tags
    assert [e.step for e in acc.Scalars("heldout/synth_4/adapted_miou")] == SESSION_EVALS
    assert [e.step for e in acc.Scalars("train/outer_loss")] == STEPS
    assert [e.value for e in acc.Scalars("train/beta")] == pytest.approx([0.003] * SESSION_STEPS)
    norms = [e.value for e in acc.Scalars("train/outer_grad_norm")]
    assert len(norms) == SESSION_STEPS and all(math.isfinite(n) and n > 0 for n in norms)
    assert all(e.value > 0 for e in acc.Scalars("train/tasks_per_second"))
    # the evaluation's picture grid: 2 image rows, each image | truth | zero-shot | adapted (and a legend)
    images = acc.Images("predictions/synth_4")
    assert [e.step for e in images] == SESSION_EVALS
    assert images[0].height >= 2 * SIZE and images[0].width >= 4 * SIZE
    assert "predictions/synth_5" in acc.Tags()["images"]


def test_best_checkpoint_is_the_step_with_the_best_validation_score(trained):
    """trainer.best_metric (default val.mean.adapted_miou) read from every evaluation: best.pt is its best step."""
    d = trained.run_dir
    metrics = json.loads((d / "metrics.json").read_text())
    acc = _acc(d)
    val = {e.step: e.value for e in acc.Scalars("val/adapted_miou")}
    assert sorted(val) == SESSION_EVALS
    best_step = max(val, key=val.get)
    assert metrics["best"]["metric"] == "val.mean.adapted_miou" and metrics["best"]["step"] == best_step
    assert math.isclose(metrics["best"]["value"], val[best_step], rel_tol=1e-5)
    best, last = load_checkpoint(trained.best), load_checkpoint(trained.last)
    assert best["step"] == best_step and best["best"]["step"] == best_step
    assert last["step"] == SESSION_STEPS and last["best"] == best["best"]
    same = all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])
    assert same == (best_step == SESSION_STEPS)
    # validation scores come from the training datasets' reserved images only (round(0.2 * 16) = 3 each)
    assert set(metrics["val"]["datasets"]) == {"synth_0", "synth_1", "synth_2", "synth_3"}
    assert all(v["images"] == 3 for v in metrics["val"]["datasets"].values())
    assert set(metrics["datasets"]) == {"synth_4", "synth_5"}
    assert metrics["objective"] == pytest.approx(metrics["val"]["mean"]["adapted_miou"])
    # the held-out scalars are logged beside them, per dataset, at the same steps
    held = {}
    for name in ("synth_4", "synth_5"):
        for e in acc.Scalars(f"heldout/{name}/adapted_miou"):
            held.setdefault(e.step, []).append(e.value)
    assert sorted(held) == SESSION_EVALS and all(len(v) == 2 and np.isfinite(v).all() for v in held.values())


def test_eval_cli_on_the_checkpoint(trained, tmp_path):
    e = tmp_path / "E"
    out = run_cli("metaseg-eval", f"checkpoint={trained.last}", f"hydra.run.dir={e}", cwd=trained.root)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((e / "eval.json").read_text())
    assert set(result["datasets"]) == {"synth_4", "synth_5"}
    for res in result["datasets"].values():
        z, a = res["zero_shot"], res["adapted"]
        for key in ("miou", "mf1", "pixel_acc"):
            assert 0 <= z[key] <= 1
            assert 0 <= a[key]["mean"] <= 1 and a[key]["ci95"] >= 0
        assert a["shots"] == 5 and len(a["per_episode"]) == 10  # eval.yaml: 5 shots, 10 episodes
        supports = [tuple(ep["support"]) for ep in a["per_episode"]]
        assert len(set(supports)) == 10  # episodes draw different support sets
        assert a["adapt_steps"] == 1 and a["adapt_lr"] == 0.05  # from the checkpoint's meta config
    assert (e / "eval.md").is_file() and (e / "pictures" / "synth_5.png").is_file()
    # seeded episodes reproduce exactly: tests/unit/test_eval_protocol.py
