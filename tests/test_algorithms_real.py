"""Every algorithm of the zoo trains and evaluates on a real mix (leave-one-retina-site-out), tiny sizes."""

import math

import pytest

from metaseg.engine.training.trainer import train
from tests.conftest import compose_cfg
from tests.test_data_real import ROOT, TINY_DATA, TINY_RUN, pytestmark  # noqa: F401 - skips without the data

ALGORITHMS = ["fomaml", "anil", "metasgd", "reptile", "mldg", "mamlpp", "erm"]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_algorithm_on_retina_lodo(tmp_path, algorithm):
    cfg = compose_cfg("train", [f"meta={algorithm}", "data=retina_lodo", ROOT, *TINY_DATA, *TINY_RUN,
                                "trainer.max_steps=1", "meta.inner_steps=2"])
    metrics = train(cfg, tmp_path / "T")
    assert metrics["step"] == 1 and list(metrics["datasets"]) == ["retina_drive"]
    adapted = metrics["datasets"]["retina_drive"]["adapted"]["miou"]["mean"]
    assert math.isfinite(adapted) and 0 <= adapted <= 1
    assert (tmp_path / "T" / "checkpoints" / "last.pt").is_file()
