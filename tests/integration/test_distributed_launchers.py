"""A parallel local sweep (hydra/launcher=joblib) runs two jobs. That the launcher configs compose:
tests/unit/test_distributed_launchers.py."""

from __future__ import annotations

import pytest

from tests.helpers import run_cli


@pytest.mark.slow
def test_joblib_sweep_runs_two_jobs_in_parallel(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason='optional extra metaseg-learn[cluster]')
    out = run_cli("metaseg-train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "experiment=smoke",
                  "trainer.device=cpu", "trainer.max_steps=1", "trainer.threads=1", "eval.episodes=1", "seed=0,1",
                  f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(p.parent.name for p in tmp_path.glob("*/metrics.json")) == ["0", "1"]
