"""Fixtures and hooks of both tiers: tests/unit (tiny models, no commands, seconds) and
tests/integration (the installed commands and real trainings). Helpers are in tests/helpers.py.

Nothing heavy is imported at the top: under pytest-xdist the controlling process loads this file
too but runs no test, and torch, Hydra and metaseg would cost it seconds before any worker starts.
"""

import json
import os

import pytest

# Under pytest-xdist (the default: two workers, see pyproject.toml) each worker computes with one
# torch thread, and the commands and scripts it starts inherit OMP_NUM_THREADS=1, so two workers
# do not oversubscribe two cores. Run in one process (-n 0), torch keeps its own default.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture
def tiny_cfg():
    from tests.helpers import TINY, compose_cfg

    return lambda *overrides: compose_cfg("train", [*TINY, "trainer.device=cpu", *overrides])


@pytest.fixture(scope="module")
def heldout():
    """A held-out synthetic domain of 12 images at 32 px."""
    from tests.helpers import synthetic_heldout

    return synthetic_heldout(12)


@pytest.fixture
def vessel_root(tmp_path):
    """Three tiny vessel-like folder datasets (data=binary_patches' names) under ``tmp_path``."""
    from tests.helpers import vessel_folders

    return vessel_folders(tmp_path)


@pytest.fixture
def readme_conf(tmp_path) -> list[str]:
    """The README's own configs on Hydra's search path, their datasets under ``tmp_path``."""
    from tests.readme import readme_conf as overrides

    return overrides(tmp_path)


@pytest.fixture
def places(tmp_path) -> dict[str, str]:
    """Real values for the README commands' placeholders (CKPT, DIR, ...), under ``tmp_path``."""
    from tests.readme import placeholders

    return placeholders(tmp_path)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """smp's download function serving a resnet18 encoder's weights (conv1 redrawn, so recognisable)
    and config (HUB_STATS) from local files: named weights without the network."""
    import segmentation_models_pytorch as smp
    import torch
    from safetensors.torch import save_file

    from tests.helpers import HUB_STATS

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


def _order(item) -> tuple[bool, bool]:
    """The integration tier first: its modules are the long ones, and xdist hands whole modules out
    in this order (--dist loadscope --no-loadscope-reorder), so none is left for the end. Its first
    module trains the shared run (tests/integration/conftest.py), so that the other worker starts on
    modules that do not wait for it."""
    return item.path.parent.name == "unit", item.path.name != "test_cli_end_to_end.py"


def pytest_collection_modifyitems(config, items):
    import torch

    items.sort(key=_order)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
