"""Training in every precision on a CUDA device (skipped without one): MAML, and every other algorithm.
The meta-gradients in each precision on the CPU: tests/unit/test_precision.py and
tests/unit/test_algorithms_precision.py."""

import pytest

from metaseg.engine.training.trainer import train


@pytest.mark.cuda
def test_cuda_training_step_in_every_precision(tiny_cfg, tmp_path):
    for mode in ("32", "bf16", "16"):
        m = train(tiny_cfg("trainer.device=cuda", f"trainer.precision={mode}", "trainer.max_steps=3"),
                  tmp_path / mode)
        assert m["step"] == 3 and all(0 <= r["adapted"]["miou"]["mean"] <= 1 for r in m["datasets"].values())


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["fomaml", "anil", "metasgd", "reptile", "mldg", "erm", "mamlpp"])
def test_cuda_training_in_every_precision(tiny_cfg, tmp_path, name):
    for mode in ("32", "bf16", "16"):
        m = train(tiny_cfg(f"meta={name}", "trainer.device=cuda", f"trainer.precision={mode}", "trainer.max_steps=3",
                           "trainer.eval_every=0"), tmp_path / mode)
        assert m["step"] == 3 and 0 <= m["objective"] <= 1
