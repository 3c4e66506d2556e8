"""Every algorithm of the zoo trains and evaluates on a real mix (leave-one-retina-site-out), tiny sizes.

Slow (seven trainings, ~25 s on two idle cores): the default suite trains every algorithm on the
synthetic mix (tests/integration/test_algorithms_train.py) and MAML on retina_lodo
(tests/integration/test_data_real.py).
"""

import math

import pytest

from metaseg.engine.training.trainer import train
from tests.helpers import REAL_ROOT as ROOT
from tests.helpers import REAL_TINY_DATA as TINY_DATA
from tests.helpers import REAL_TINY_RUN as TINY_RUN
from tests.helpers import compose_cfg, needs_real_data

pytestmark = [needs_real_data, pytest.mark.slow]

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
