"""Model factory: local encoder weights, clear errors, the model variants (named weights:
tests/unit/test_pretrained_weights.py)."""

import pytest
import torch

from metaseg.config import ModelConfig
from metaseg.models import build_model
from metaseg.utils.errors import ConfigError

SMALL = {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}


def test_local_encoder_weights_are_loaded(tmp_path):
    torch.manual_seed(1)
    donor = build_model(ModelConfig(extra=SMALL), 4)
    full = __import__("segmentation_models_pytorch").create_model(
        "Unet", encoder_name="resnet18", encoder_weights=None, classes=4, **{**SMALL, "decoder_channels": (16, 8, 8)})
    torch.save(full.encoder.state_dict(), tmp_path / "enc.pth")
    model = build_model(ModelConfig(encoder_weights=str(tmp_path / "enc.pth"), extra=SMALL), 4)
    ref = full.encoder.state_dict()
    loaded = model.encoder.state_dict()
    assert loaded and all(torch.equal(loaded[k], ref[k]) for k in loaded)
    assert not torch.equal(donor.encoder.conv1.weight, model.encoder.conv1.weight)


def test_wrong_weights_file_is_named(tmp_path):
    torch.save({"something": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match="bad.pth.*no tensor whose name matches"):
        build_model(ModelConfig(encoder_weights=str(tmp_path / "bad.pth"), extra=SMALL), 4)


def test_unknown_encoder_is_a_config_error():
    with pytest.raises(ConfigError, match="model.encoder='resnet1800'"):
        build_model(ModelConfig(encoder="resnet1800"), 4)


def test_unused_encoder_stages_are_dropped():
    model = build_model(ModelConfig(extra=SMALL), 4)
    assert isinstance(model.encoder.layer4, torch.nn.Identity)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_smooth_model_swaps_relu_and_max_pooling_and_keeps_the_weights():
    torch.manual_seed(0)
    plain = build_model(ModelConfig(extra=SMALL), 2)
    torch.manual_seed(0)
    smooth = build_model(ModelConfig(smooth=True, extra=SMALL), 2)
    kinds = {type(m) for m in smooth.modules()}
    assert torch.nn.SiLU in kinds and torch.nn.AvgPool2d in kinds
    assert not kinds & {torch.nn.ReLU, torch.nn.MaxPool2d}
    assert torch.nn.ReLU in {type(m) for m in plain.modules()}
    # same tensors by name, so encoder weights and checkpoints of either load into the other
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in smooth.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(plain(x), smooth(x))
