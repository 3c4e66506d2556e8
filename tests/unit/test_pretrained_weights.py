"""Encoder weights by the names smp knows (through smp's own download and cache), or from a local file.

No test needs the network: offline is the hub's own offline mode on an empty cache, and the
hub path replaces smp's download function (``hf_hub_download``) by one that serves local files,
so everything smp does after the download (reading, loading, patching the first conv) runs
(the ``hub`` fixture, tests/conftest.py). A run with named weights:
tests/integration/test_pretrained_weights.py.
"""

import logging

import pytest
import segmentation_models_pytorch as smp
import torch
from huggingface_hub import constants
from omegaconf import OmegaConf

from metaseg.config import ModelConfig
from metaseg.models import build_model
from metaseg.models.weights import input_normalisation
from metaseg.utils.errors import ConfigError
from tests.helpers import HUB_STATS, ROOT, compose_cfg

SMALL = {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """The hub in offline mode (HF_HUB_OFFLINE=1) over an empty cache; returns the cache folder."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_named_weights_offline_stop_in_one_line_naming_both_fixes(offline):
    cfg = ModelConfig(encoder_weights="imagenet", extra=SMALL)
    for attempt in (lambda: build_model(cfg, 4), lambda: input_normalisation(OmegaConf.create({"mean": None, "std": None}), cfg)):
        with pytest.raises(ConfigError) as exc:
            attempt()
        msg = str(exc.value)
        assert "\n" not in msg and msg.startswith("model.encoder_weights='imagenet'")
        assert "HF_HUB_OFFLINE=1" in msg and str(offline) in msg  # why, and the cache folder to fill
        assert "smp.encoders.get_encoder('resnet18', weights='imagenet')" in msg  # the command to fill it
        assert "model.encoder_weights=/path/to/encoder.pth" in msg  # or a local file


def test_unknown_weight_name_lists_smps_names_for_that_encoder():
    for encoder in ("resnet18", "resnet34"):
        names = list(smp.encoders.encoders[encoder]["pretrained_settings"])
        with pytest.raises(ConfigError) as exc:
            build_model(ModelConfig(encoder=encoder, encoder_weights="imagenett", extra=SMALL), 4)
        msg = str(exc.value)
        assert "\n" not in msg and "'imagenett' is not a weight name smp knows" in msg
        assert f"(it knows {', '.join(names)})" in msg
    with pytest.raises(ConfigError, match=r"'weights/enc.pth' is not a file"):  # a path, not a name
        build_model(ModelConfig(encoder_weights="weights/enc.pth", extra=SMALL), 4)


def test_local_file_still_loads_and_the_fit_is_logged(tmp_path, caplog):
    torch.manual_seed(1)
    encoder = smp.encoders.get_encoder("resnet18")
    torch.save(encoder.state_dict(), tmp_path / "enc.pth")
    with caplog.at_level(logging.INFO, logger="metaseg.models.weights"):
        model = build_model(ModelConfig(encoder_weights=str(tmp_path / "enc.pth"), extra=SMALL), 4)
    assert torch.equal(model.encoder.conv1.weight, encoder.conv1.weight)
    runs = [k for k in encoder.state_dict() if not k.startswith(("layer3.", "layer4."))]  # encoder_depth: 3
    assert f"{len(runs)} encoder tensors loaded" in caplog.text
    assert "0 missing" in caplog.text and "0 unexpected" in caplog.text
    # the encoder of a metaseg model (stages cut, no running statistics) fits the same model config too
    torch.save(model.encoder.state_dict(), tmp_path / "own.pth")
    again = build_model(ModelConfig(encoder_weights=str(tmp_path / "own.pth"), extra=SMALL), 4)
    assert torch.equal(again.encoder.layer2[1].conv2.weight, encoder.layer2[1].conv2.weight)
    # a local file carries no statistics: null data.mean/std stay 0.5/0.25
    data = OmegaConf.create({"mean": None, "std": None})
    assert input_normalisation(data, ModelConfig(encoder_weights=str(tmp_path / "enc.pth")))[:2] == (
        [0.5] * 3, [0.25] * 3)


def test_hub_path_loads_through_smp_and_brings_its_normalisation(hub):
    state, calls = hub
    model = build_model(ModelConfig(encoder_weights="imagenet", extra=SMALL), 4)
    assert ("smp-hub/resnet18.imagenet", "model.safetensors") in calls
    assert torch.equal(model.encoder.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.encoder.layer2[0].conv1.weight, state["layer2.0.conv1.weight"])
    # in_channels=1: smp sums the RGB filters of the first conv; the statistics follow (their mean)
    gray = build_model(ModelConfig(encoder_weights="imagenet", in_channels=1, extra=SMALL), 4)
    assert torch.allclose(gray.encoder.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    null = OmegaConf.create({"mean": None, "std": None})
    mean, std, source = input_normalisation(null, ModelConfig(encoder_weights="imagenet"))
    assert (mean, std) == (HUB_STATS["mean"], HUB_STATS["std"]) and "imagenet" in source
    mean, std, _ = input_normalisation(null, ModelConfig(encoder_weights="imagenet", in_channels=1))
    assert mean == pytest.approx([0.5]) and std == pytest.approx([0.25])
    explicit = OmegaConf.create({"mean": [0.1, 0.2, 0.3], "std": [1.0, 1.0, 1.0]})
    assert input_normalisation(explicit, ModelConfig(encoder_weights="imagenet"))[:2] == (
        [0.1, 0.2, 0.3], [1.0, 1.0, 1.0])


def test_shipped_data_configs_keep_their_normalisation(offline):
    """data.mean/std null now means "from the weights"; without named weights every shipped config
    normalises exactly as before: the generated data by 0.5/0.25, the others by ImageNet's."""
    names = sorted(p.stem for p in (ROOT / "conf" / "data").glob("*.yaml"))
    assert "synthetic" in names
    for name in names:
        cfg = compose_cfg("train", [f"data={name}"])
        mean, std, _ = input_normalisation(cfg.data, cfg.model)
        assert (mean, std) == (([0.5] * 3, [0.25] * 3) if name == "synthetic" else IMAGENET), name
    voc = compose_cfg("train", ["data=voc"]).data  # set explicitly: it wins, nothing is looked up (offline here)
    assert input_normalisation(voc, ModelConfig(encoder_weights="imagenet"))[:2] == IMAGENET
