"""Odd weight files as ``model.encoder_weights`` or ``meta.init_from``: one clear line each, never a traceback.

Every message is checked for being one line, naming the file and, where a key is at fault, the
first such key; a file that does not fit the encoder is refused unless asked otherwise.
"""

import logging
import os

import pytest
import segmentation_models_pytorch as smp
import torch

from metaseg.config import ModelConfig
from metaseg.engine.training.init_from import initialise
from metaseg.models import build_model
from metaseg.utils.errors import ConfigError

SMALL = {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}
CLASSES = ["background", "a", "b", "c"]


def _via_encoder_weights(path, **model):
    build_model(ModelConfig(encoder_weights=str(path), extra=SMALL, **model), 4)


def _via_init_from(path, **model):
    initialise(build_model(ModelConfig(extra=SMALL), 4), str(path), CLASSES, **model)


BOTH = pytest.mark.parametrize("load,key", [(_via_encoder_weights, "model.encoder_weights"),
                                            (_via_init_from, "meta.init_from")])


def _one_line_error(load, path, **kwargs) -> str:
    with pytest.raises(ConfigError) as exc:
        load(path, **kwargs)
    msg = str(exc.value)
    assert "\n" not in msg and "\x1b" not in msg and str(path) in msg
    return msg


@BOTH
@pytest.mark.parametrize("content", [torch.zeros(3), [torch.zeros(3), 1]], ids=["tensor", "list"])
def test_a_tensor_or_a_list_is_named_not_an_attribute_error(load, key, content, tmp_path):
    torch.save(content, tmp_path / "w.pt")
    msg = _one_line_error(load, tmp_path / "w.pt")
    assert msg.startswith(key) and f"holds a {type(content).__name__}" in msg and "state dict" in msg


@BOTH
def test_wrong_shapes_name_the_first_key_with_both_shapes(load, key, tmp_path):
    state = smp.encoders.get_encoder("resnet18").state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)  # a 3x3 stem instead of 7x7
    torch.save(state, tmp_path / "w.pt")
    msg = _one_line_error(load, tmp_path / "w.pt")
    assert msg.startswith(key) and "'conv1.weight'" in msg and "[64, 3, 3, 3]" in msg and "[64, 3, 7, 7]" in msg


@BOTH
def test_a_resnet34_encoder_is_refused_by_a_resnet18_model(load, key, tmp_path, caplog):
    torch.manual_seed(0)
    big = smp.encoders.get_encoder("resnet34")
    torch.save(big.state_dict(), tmp_path / "r34.pt")
    msg = _one_line_error(load, tmp_path / "r34.pt")
    assert msg.startswith(key) and "first unexpected 'layer1.2." in msg and "strict_weights=false" in msg
    # asked to, it loads what fits, and says what it did
    with caplog.at_level(logging.INFO, logger="metaseg.models.weights"):
        load(tmp_path / "r34.pt", **({"strict_weights": False} if key.startswith("model") else {"strict": False}))
    assert "encoder tensors loaded" in caplog.text and "unexpected" in caplog.text
    assert "0 missing" in caplog.text and "0 unexpected" not in caplog.text


def test_a_fitting_encoder_file_logs_what_it_loaded(tmp_path, caplog):
    state = smp.encoders.get_encoder("resnet18").state_dict()
    state["fc.weight"] = torch.zeros(1000, 512)  # a classifier, as torchvision saves it: smp drops it itself
    torch.save(state, tmp_path / "r18.pt")
    with caplog.at_level(logging.INFO, logger="metaseg.models.weights"):
        _via_encoder_weights(tmp_path / "r18.pt")
    assert "0 missing" in caplog.text and "0 unexpected" in caplog.text


@BOTH
def test_an_empty_file_says_so(load, key, tmp_path):
    (tmp_path / "w.pt").write_bytes(b"")
    msg = _one_line_error(load, tmp_path / "w.pt")
    assert msg.startswith(key) and "is empty (0 bytes)" in msg and not msg.rstrip().endswith(":")


class _Payload:
    def __reduce__(self):
        return (os.getcwd, ())  # harmless if it ever ran; weights_only must refuse it anyway


@BOTH
def test_a_pickle_with_code_is_refused_without_torchs_unsafe_advice(load, key, tmp_path):
    torch.save({"conv1.weight": _Payload()}, tmp_path / "w.pt")
    msg = _one_line_error(load, tmp_path / "w.pt")
    assert msg.startswith(key) and "refuses" in msg and "getcwd" in msg
    assert "weights_only" not in msg and "False" not in msg
