"""meta.init_from (metaseg and encoder files) and the two-stage recipe (pretrain stage, then meta-training)."""

import pytest
import torch

from metaseg.engine.checkpoint import load_checkpoint
from metaseg.engine.training.init_from import initialise
from metaseg.engine.training.trainer import train
from metaseg.models.factory import build_model
from metaseg.utils.errors import ConfigError
from tests.conftest import TINY, compose_cfg

QUICK = [*TINY, "trainer.device=cpu", "eval.episodes=1", "eval.pictures=0", "trainer.monitor_tasks=0",
         "trainer.eval_every=0"]


@pytest.fixture(scope="module")
def erm_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("erm")
    train(compose_cfg("train", [*QUICK, "meta=erm", "trainer.max_steps=2", "meta.outer_lr=0.01"]), d)
    return d / "checkpoints" / "last.pt"


def test_init_from_an_erm_checkpoint_loads_its_weights(erm_run, tmp_path):
    ckpt = load_checkpoint(erm_run)
    cfg = compose_cfg("train", QUICK)
    model = build_model(cfg.model, 4)
    assert not all(torch.equal(v, ckpt["model"][k]) for k, v in model.state_dict().items())
    record = initialise(model, str(erm_run), ckpt["classes"])
    assert record["kind"] == "checkpoint" and record["algorithm"] == "erm" and record["step"] == 2
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in model.state_dict().items())
    # wired into training: MAML from it with a vanishing beta ends (numerically) where erm left off
    run = train(compose_cfg("train", [*QUICK, f"meta.init_from={erm_run}", "trainer.max_steps=1",
                                      "meta.outer_lr=1e-12"]), tmp_path / "maml")
    after = load_checkpoint(tmp_path / "maml" / "checkpoints" / "last.pt")
    assert after["config"]["meta"]["init_from"] == str(erm_run) and run["step"] == 1
    assert all(torch.allclose(v, ckpt["model"][k], atol=1e-8) for k, v in after["model"].items())


def test_init_from_another_label_space_loads_the_body_only(erm_run):
    ckpt = load_checkpoint(erm_run)
    model = build_model(compose_cfg("train", QUICK).model, 2)
    head_before = model.segmentation_head[0].weight.clone()
    record = initialise(model, str(erm_run), ["background", "foreground"])
    assert record["kind"] == "checkpoint body"
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ckpt["model"].items() if not k.startswith("segmentation_head"))
    assert torch.equal(model.segmentation_head[0].weight, head_before)


def test_init_from_an_encoder_file_loads_the_encoder_only(erm_run, tmp_path):
    ckpt = load_checkpoint(erm_run)
    model = build_model(compose_cfg("train", QUICK).model, 4)
    source = build_model(compose_cfg("train", QUICK).model, 4)
    source.load_state_dict(ckpt["model"])
    torch.save(source.encoder.state_dict(), tmp_path / "enc.pth")
    decoder_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    assert initialise(model, str(tmp_path / "enc.pth"), ["a"])["kind"] == "encoder"
    assert all(torch.equal(v, source.encoder.state_dict()[k]) for k, v in model.encoder.state_dict().items())
    assert all(torch.equal(v, decoder_before[k]) for k, v in model.decoder.state_dict().items())
    with pytest.raises(ConfigError, match=r"meta.init_from='.*nope.pt' is not a file"):
        initialise(model, str(tmp_path / "nope.pt"), ["a"])
    (tmp_path / "junk.pt").write_text("not torch")
    with pytest.raises(ConfigError, match="cannot be read as plain torch data"):
        initialise(model, str(tmp_path / "junk.pt"), ["a"])


def test_two_stage_recipe_runs_from_one_config(tmp_path):
    cfg = compose_cfg("train", ["experiment=two_stage", *QUICK, "pretrain.steps=2", "trainer.max_steps=1",
                                "trainer.eval_every=1"])
    assert cfg.pretrain.algorithm == "erm" and cfg.meta.algorithm == "maml"
    run = train(cfg, tmp_path)
    first = load_checkpoint(tmp_path / "pretrain" / "checkpoints" / "last.pt")
    assert first["step"] == 2 and first["config"]["meta"]["algorithm"] == "erm"
    assert first["config"]["pretrain"]["steps"] == 0
    second = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert second["config"]["meta"]["algorithm"] == "maml" and run["step"] == 1
    assert second["config"]["meta"]["init_from"].endswith("pretrain/checkpoints/best.pt")
    # the shipped experiment splits a single-stage arm's 200 outer steps
    full = compose_cfg("train", ["experiment=two_stage"])
    assert full.pretrain.steps + full.trainer.max_steps == compose_cfg("train", []).trainer.max_steps == 200
