"""Fixtures and hooks of both tiers: tests/unit (tiny models, no commands, seconds) and
tests/integration (the installed commands and real trainings). Helpers are in tests/helpers.py."""

import json
import os

import pytest
import torch

from tests.helpers import HUB_STATS, TINY, compose_cfg, synthetic_heldout, vessel_folders

# Under pytest-xdist (the default: two workers, see pyproject.toml) each worker computes with one
# torch thread, and the commands and scripts it starts inherit OMP_NUM_THREADS=1, so two workers
# do not oversubscribe two cores. Run alone (-p no:xdist), torch keeps its own default.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture
def tiny_cfg():
    return lambda *overrides: compose_cfg("train", [*TINY, "trainer.device=cpu", *overrides])


@pytest.fixture(scope="module")
def heldout():
    """A held-out synthetic domain of 12 images at 32 px."""
    return synthetic_heldout(12)


@pytest.fixture
def vessel_root(tmp_path):
    """Three tiny vessel-like folder datasets (data=binary_patches' names) under ``tmp_path``."""
    return vessel_folders(tmp_path)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """smp's download function serving a resnet18 encoder's weights (conv1 redrawn, so recognisable)
    and config (HUB_STATS) from local files: named weights without the network."""
    import segmentation_models_pytorch as smp
    from safetensors.torch import save_file

    torch.manual_seed(3)
    state = smp.encoders.get_encoder("resnet18").state_dict()
    state["conv1.weight"] = torch.randn_like(state["conv1.weight"])  # recognisable
    files = {"model.safetensors": tmp_path / "model.safetensors", "config.json": tmp_path / "config.json"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(files["model.safetensors"]))
    files["config.json"].write_text(json.dumps({**HUB_STATS, "input_space": "RGB", "input_range": [0, 1]}))
    calls = []

    def download(repo_id, filename, revision=None, **kwargs):
        calls.append((repo_id, filename))
        return str(files[filename])

    monkeypatch.setattr(smp.encoders, "hf_hub_download", download)
    return state, calls


def pytest_collection_modifyitems(config, items):
    # the integration tier first: its modules are the long ones, and xdist hands whole modules
    # out in this order (--dist loadscope --no-loadscope-reorder), so none is left for the end
    items.sort(key=lambda item: item.path.parent.name == "unit")
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
