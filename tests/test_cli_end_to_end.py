"""The installed commands end to end, exactly as the README's contract writes them.

Training runs the contract command on the default mix (20 outer steps, about a minute);
evaluation runs ``metaseg-eval checkpoint=D/checkpoints/last.pt hydra.run.dir=E`` as is.
"""

import json

import pytest
import torch

from tests.conftest import run_cli

CONTRACT = ["meta.inner_lr=0.05", "meta.outer_lr=0.001", "meta.inner_steps=3", "trainer.max_steps=20"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    run_dir = root / "D"
    out = run_cli("metaseg-train", *CONTRACT, f"hydra.run.dir={run_dir}", cwd=root, baseline=True)  # as typed
    assert out.returncode == 0, out.stderr[-3000:]
    (root / "console.txt").write_text(out.stdout + out.stderr)
    return root, run_dir


def test_train_writes_checkpoint_metrics_and_tensorboard(trained):
    _, d = trained
    assert (d / "checkpoints" / "last.pt").is_file()
    assert (d / ".hydra" / "config.yaml").is_file()
    assert list((d / "tb").glob("events.out.tfevents.*"))
    assert (d / "train.log").read_text().count("step 20/20") == 1
    metrics = json.loads((d / "metrics.json").read_text())
    assert metrics["step"] == 20
    for name in ("synth_4", "synth_5"):
        res = metrics["datasets"][name]
        assert 0 <= res["zero_shot"]["miou"] <= 1
        assert 0 <= res["adapted"]["miou"]["mean"] <= 1


def test_train_ends_with_the_summary_beside_the_random_init_baseline(trained):
    root, d = trained
    metrics = json.loads((d / "metrics.json").read_text())
    assert set(metrics["baseline"]["datasets"]) == {"synth_4", "synth_5"}  # eval.baseline: on by default
    console = (root / "console.txt").read_text()
    summary = console[console.index("==== summary ===="):]
    for name in ("synth_4", "synth_5"):
        a = metrics["datasets"][name]["adapted"]["5"]["miou"]
        b = metrics["baseline"]["datasets"][name]["adapted"]["5"]["miou"]
        row = next(line for line in summary.splitlines() if line.startswith(f"| {name} | 5-shot"))
        assert f"{100 * a['mean']:.1f} ± {100 * a['ci95']:.1f}" in row
        assert f"{100 * (a['mean'] - b['mean']):+.1f}" in row
    assert "tensorboard --logdir D  (" in summary and "metaseg-eval checkpoint=D/checkpoints/" in summary  # from cwd


def test_checkpoint_is_plain_data(trained):
    _, d = trained
    ckpt = torch.load(d / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 20
    assert isinstance(ckpt["config"], dict) and ckpt["config"]["meta"]["inner_lr"] == 0.05
    assert ckpt["config"]["meta"]["inner_steps"] == 3
    assert set(ckpt) >= {"model", "optimizer", "step", "config", "version"}
    assert all(isinstance(v, torch.Tensor) for v in ckpt["model"].values())


def test_tensorboard_has_the_documented_scalars(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, d = trained
    acc = EventAccumulator(str(d / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/outer_loss", "train/query_loss_before", "train/query_loss_after",
            "heldout/synth_4/zero_shot_miou", "heldout/synth_4/adapted_miou",
            "heldout/synth_5/adapted_mf1"} <= tags
    assert [e.step for e in acc.Scalars("heldout/synth_4/adapted_miou")] == [20]
    assert [e.step for e in acc.Scalars("train/outer_loss")] == [10, 20]


def test_eval_cli_on_the_checkpoint(trained):
    root, d = trained
    e = root / "E"
    out = run_cli("metaseg-eval", f"checkpoint={d / 'checkpoints' / 'last.pt'}", f"hydra.run.dir={e}", cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((e / "eval.json").read_text())
    assert set(result["datasets"]) == {"synth_4", "synth_5"}
    for res in result["datasets"].values():
        z, a = res["zero_shot"], res["adapted"]
        for key in ("miou", "mf1", "pixel_acc"):
            assert 0 <= z[key] <= 1
            assert 0 <= a[key]["mean"] <= 1 and a[key]["ci95"] >= 0
        assert a["shots"] == 5 and len(a["per_episode"]) == 10  # eval.yaml: 10 episodes
        supports = [tuple(ep["support"]) for ep in a["per_episode"]]
        assert len(set(supports)) == 10  # episodes draw different support sets
        assert a["adapt_steps"] == 3 and a["adapt_lr"] == 0.05  # from the checkpoint's meta config
    # seeded episodes reproduce exactly: tests/test_eval_protocol.py


def test_eval_missing_checkpoint_is_one_line(tmp_path):
    out = run_cli("metaseg-eval", "checkpoint=nope/last.pt", f"hydra.run.dir={tmp_path / 'E'}", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "checkpoint='nope/last.pt' does not exist" in out.stderr
    assert not (tmp_path / "E" / "eval.json").exists()


def test_eval_refuses_a_checkpoint_that_runs_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"model": {}, "config": {}, "format": 1, "x": Evil()}, tmp_path / "evil.pt")
    out = run_cli("metaseg-eval", f"checkpoint={tmp_path / 'evil.pt'}", f"hydra.run.dir={tmp_path / 'E'}",
                  cwd=tmp_path)
    assert out.returncode == 2 and "pwned" not in out.stdout
    assert "cannot be loaded as plain data" in out.stderr


def test_eval_data_keys_with_a_checkpoint_say_what_to_pass(trained):
    root, d = trained
    out = run_cli("metaseg-eval", f"checkpoint={d / 'checkpoints' / 'last.pt'}", "data.root=/elsewhere",
                  f"hydra.run.dir={root / 'E2'}", cwd=root)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "pass data_root=/elsewhere" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = run_cli("metaseg-eval", f"checkpoint={d / 'checkpoints' / 'last.pt'}", "data.size=64",
                  f"hydra.run.dir={root / 'E2'}", cwd=root)
    assert out.returncode == 2 and "pass data=NAME" in out.stderr
    assert not (root / "E2" / "eval.json").exists()
