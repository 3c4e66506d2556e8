import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

import metaseg.config  # noqa: F401 - registers schemas

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = ["experiment=smoke"]
# The random-init baseline (eval.baseline, on for users) doubles a run's final evaluation; tests pay
# for it only where they test it: they pass eval.baseline=true (or run_cli(..., baseline=True)).
NO_BASELINE = "eval.baseline=false"


def without_baseline(overrides) -> list[str]:
    """``overrides`` with ``eval.baseline=false`` unless they set ``eval.baseline`` themselves."""
    overrides = list(overrides)
    if any(o.lstrip("+~").startswith("eval.baseline=") for o in overrides):
        return overrides
    return [*overrides, NO_BASELINE]


def compose_cfg(name: str = "train", overrides=()):
    """``conf/NAME.yaml`` with ``overrides`` as the commands compose it, without the baseline (above)."""
    if name in ("train", "eval"):
        overrides = without_baseline(overrides)
    with initialize_config_module(config_module="metaseg.conf", version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def seeded_checkpoint(path: Path, cfg, seed: int, step: int) -> Path:
    """A checkpoint of ``cfg``'s model at weights drawn by ``seed``: evaluation needs only weights and a config."""
    from omegaconf import OmegaConf

    from metaseg.engine.checkpoint import save_checkpoint
    from metaseg.models.factory import build_model

    torch.manual_seed(seed)
    model = build_model(cfg.model, len(cfg.data.classes))
    save_checkpoint(path, model=model.state_dict(), step=step, config=OmegaConf.to_container(cfg, resolve=True),
                    classes=list(cfg.data.classes))
    return path


@pytest.fixture
def tiny_cfg():
    return lambda *overrides: compose_cfg("train", [*TINY, "trainer.device=cpu", *overrides])


def run_cli(prog: str, *args: str, cwd, timeout=600, env=None, baseline=False) -> subprocess.CompletedProcess:
    """Run an installed console script from ``cwd`` (not the repo), as a user would; ``metaseg-train``
    and ``metaseg-eval`` without the random-init baseline unless ``baseline`` (then ``args`` as given)."""
    if prog in ("metaseg-train", "metaseg-eval") and not baseline:
        args = tuple(without_baseline(args))
    full_env = {**os.environ, **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([str(BIN / prog), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
