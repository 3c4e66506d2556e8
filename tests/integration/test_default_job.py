"""The default job, exactly as a user runs it: `metaseg-train` with no arguments (slow: ~6 min)."""

import json

import pytest

from tests.helpers import run_cli


@pytest.mark.slow
def test_default_job_adapts_clearly_above_zero_shot(tmp_path):
    out = run_cli("metaseg-train", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=1200, baseline=True)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["datasets"]) == {"synth_4", "synth_5"} == set(metrics["baseline"]["datasets"])
    assert "| synth_4 | 5-shot" in out.stdout + out.stderr  # the summary, beside the random-init baseline
    for name, res in metrics["datasets"].items():
        zero, adapted = res["zero_shot"]["miou"], res["adapted"]["miou"]
        # clearly: by more than 0.1 mIoU and beyond the episode confidence interval
        assert adapted["mean"] - adapted["ci95"] > zero + 0.1, (name, zero, adapted)
