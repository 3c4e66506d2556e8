"""meta.init_from: a metaseg checkpoint of another label space gives its body, an encoder file its encoder.

Training from an initialisation and the two-stage recipe: tests/integration/test_fair_init.py.
"""

import pytest
import torch

from metaseg.engine.checkpoint import load_checkpoint
from metaseg.engine.training.init_from import initialise
from metaseg.models.factory import build_model
from metaseg.utils.errors import ConfigError
from tests.helpers import TINY, compose_cfg, seeded_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A smoke-sized checkpoint of the synthetic label space (seeded weights)."""
    return seeded_checkpoint(tmp_path_factory.mktemp("init") / "last.pt", compose_cfg("train", TINY), seed=5, step=2)


def model(classes):
    return build_model(compose_cfg("train", TINY).model, classes)


def test_init_from_another_label_space_loads_the_body_only(checkpoint):
    ckpt = load_checkpoint(checkpoint)
    net = model(2)
    head_before = net.segmentation_head[0].weight.clone()
    record = initialise(net, str(checkpoint), ["background", "foreground"])
    assert record["kind"] == "checkpoint body"
    state = net.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ckpt["model"].items() if not k.startswith("segmentation_head"))
    assert torch.equal(net.segmentation_head[0].weight, head_before)


def test_init_from_an_encoder_file_loads_the_encoder_only(checkpoint, tmp_path):
    ckpt = load_checkpoint(checkpoint)
    net, source = model(4), model(4)
    source.load_state_dict(ckpt["model"])
    torch.save(source.encoder.state_dict(), tmp_path / "enc.pth")
    decoder_before = {k: v.clone() for k, v in net.decoder.state_dict().items()}
    assert initialise(net, str(tmp_path / "enc.pth"), ["a"])["kind"] == "encoder"
    assert all(torch.equal(v, source.encoder.state_dict()[k]) for k, v in net.encoder.state_dict().items())
    assert all(torch.equal(v, decoder_before[k]) for k, v in net.decoder.state_dict().items())
    with pytest.raises(ConfigError, match=r"meta.init_from='.*nope.pt' is not a file"):
        initialise(net, str(tmp_path / "nope.pt"), ["a"])
    (tmp_path / "junk.pt").write_text("not torch")
    with pytest.raises(ConfigError, match="cannot be read as plain torch data"):
        initialise(net, str(tmp_path / "junk.pt"), ["a"])
