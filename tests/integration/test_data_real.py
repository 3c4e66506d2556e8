"""The ready mixes on the real datasets in ../shared/data train and evaluate, at tiny sizes (skipped
when it is absent), through the engine of metaseg-train and metaseg-eval: retina_lodo meta-trains,
its checkpoint scores its held-out site and another site as a folder; the shared (synthetic,
4-class) trained checkpoint scores a binary folder with a new head; binary_mix and
camvid_sequences train and evaluate. The commands themselves: tests/integration/test_cli_end_to_end.py.
That every ready config builds and holds what its files hold: tests/unit/test_data_real.py."""

import json
import logging

import pytest

from metaseg.engine.evaluation.checkpoint_eval import evaluate_checkpoint
from metaseg.engine.training.trainer import train
from tests.helpers import REAL_ROOT as ROOT
from tests.helpers import REAL_TINY_DATA as TINY_DATA
from tests.helpers import REAL_TINY_RUN as TINY_RUN
from tests.helpers import SHARED_DATA, compose_cfg, needs_real_data

pytestmark = needs_real_data


class Messages(logging.Handler):
    """The metaseg log's messages, for a module fixture (caplog is per test)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def lodo_run(tmp_path_factory):
    """``metaseg-train data=retina_lodo`` at tiny sizes (its engine, in-process), once for the tests below."""
    run = tmp_path_factory.mktemp("lodo") / "T"
    logger, handler = logging.getLogger("metaseg"), Messages()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        metrics = train(compose_cfg("train", ["data=retina_lodo", ROOT, *TINY_DATA, *TINY_RUN]), run)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return run, metrics, handler.messages


def test_retina_lodo_trains(lodo_run):
    run, metrics, messages = lodo_run
    assert json.loads((run / "metrics.json").read_text())["datasets"] == metrics["datasets"]
    assert list(metrics["datasets"]) == ["retina_drive"] and metrics["classes"] == ["background", "foreground"]
    assert metrics["step"] == 2 and 0 <= metrics["datasets"]["retina_drive"]["adapted"]["miou"]["mean"] <= 1
    assert "maml-training Unet-resnet18 on ['retina_stare', 'retina_chasedb1'], held out ['retina_drive']" in \
        "\n".join(messages)


def test_retina_lodo_checkpoint_evaluates(lodo_run, tmp_path):
    run, _, _ = lodo_run
    cfg = compose_cfg("eval", [f"checkpoint={run / 'checkpoints' / 'last.pt'}", "device=cpu", "eval.shots=2",
                               "eval.episodes=2"])
    evaluate_checkpoint(cfg, tmp_path / "E")
    result = json.loads((tmp_path / "E" / "eval.json").read_text())
    assert result["head"]["kind"] == "checkpoint" and result["datasets"]["retina_drive"]["images"] == 10
    assert len(result["datasets"]["retina_drive"]["adapted"]["per_episode"]) == 2


def test_retina_lodo_checkpoint_on_another_site_as_a_folder(lodo_run, tmp_path):
    # same binary label space, so the checkpoint's own head is kept
    run, _, _ = lodo_run
    cfg = compose_cfg("eval", [f"checkpoint={run / 'checkpoints' / 'last.pt'}", "data=folder",
                               f"data.root={SHARED_DATA / 'retina_stare'}", "data.max_images=5", "device=cpu",
                               "eval.shots=2", "eval.episodes=1"])
    result = evaluate_checkpoint(cfg, tmp_path / "F")
    assert result["head"]["kind"] == "checkpoint" and result["datasets"]["folder"]["images"] == 5


def test_synthetic_checkpoint_evaluates_a_binary_folder(trained, tmp_path):
    cfg = compose_cfg("eval", [f"checkpoint={trained.last}", "data=folder", f"data.root={SHARED_DATA / 'retina_stare'}",
                               "data.max_images=6", "device=cpu", "eval.shots=2", "eval.episodes=2"])
    evaluate_checkpoint(cfg, tmp_path / "E")
    result = json.loads((tmp_path / "E" / "eval.json").read_text())
    assert result["head"]["kind"] == "new" and result["classes"] == ["background", "foreground"]
    res = result["datasets"]["folder"]
    assert res["images"] == 6 and len(res["adapted"]["per_episode"]) == 2
    assert 0 <= res["adapted"]["miou"]["mean"] <= 1


@pytest.mark.slow  # two more trainings (~10 s on two idle cores): retina_lodo's above is the default suite's
@pytest.mark.parametrize("name", ["binary_mix", "camvid_sequences"])
def test_ready_mixes_train_and_evaluate(tmp_path, name):
    cfg = compose_cfg("train", [f"data={name}", ROOT, *TINY_DATA, *TINY_RUN])
    metrics = train(cfg, tmp_path / "T")
    held = {"binary_mix": ["skin_ph2"], "camvid_sequences": ["camvid_0001TP"]}[name]
    assert list(metrics["datasets"]) == held
    assert len(metrics["datasets"][held[0]]["zero_shot"]["iou"]) == len(cfg.data.classes)
    ev = compose_cfg("eval", [f"checkpoint={tmp_path / 'T' / 'checkpoints' / 'last.pt'}", "device=cpu",
                              "eval.shots=2", "eval.episodes=1"])
    result = evaluate_checkpoint(ev, tmp_path / "E")
    assert result["head"]["kind"] == "checkpoint" and list(result["datasets"]) == held
    assert 0 <= result["mean"]["adapted_miou"] <= 1
