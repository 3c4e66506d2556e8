"""Cluster and parallel local sweeps: the launcher configs compose (no cluster here). A parallel
local sweep running: tests/integration/test_distributed_launchers.py (slow)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module

import metaseg.config  # noqa: F401 - registers schemas



def _hydra(*overrides):
    with initialize_config_module(config_module="metaseg.conf", version_base="1.3"):
        return compose("train", ["experiment=smoke", *overrides], return_hydra_config=True)


def test_slurm_launcher_composes_with_our_defaults_and_overrides():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason='optional extra metaseg-learn[cluster]')
    cfg = _hydra("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.timeout_min) == ("gpu", 30)  # command line wins
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.array_parallelism) == (1, 1, 32)  # our file
    assert launcher.submitit_folder.endswith(".submitit/%j")
    assert cfg.meta.meta_batch == 2  # the job's own config is untouched


def test_joblib_launcher_composes_for_parallel_local_sweeps():
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason='optional extra metaseg-learn[cluster]')
    cfg = _hydra("hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert cfg.hydra.launcher._target_.endswith("joblib_launcher.JoblibLauncher")
    assert cfg.hydra.launcher.n_jobs == 2


def test_default_launcher_is_hydras_basic_one():
    assert _hydra().hydra.launcher._target_.endswith(".BasicLauncher")
