"""Config composition: every group resolves, and mistakes stop the run naming the key.

The commands' one-line errors for the same mistakes: tests/integration/test_config.py.
"""

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from metaseg.engine.training.trainer import validate
from metaseg.utils.errors import ConfigError
from tests.helpers import compose_cfg


def test_default_config_is_the_documented_default():
    cfg = compose_cfg("train")
    assert cfg.meta.algorithm == "maml" and not cfg.meta.first_order
    assert cfg.data.train == ["synth_0", "synth_1", "synth_2", "synth_3"]
    assert cfg.data.heldout == ["synth_4", "synth_5"]
    assert len(cfg.data.classes) == 4
    assert cfg.model.encoder_weights is None
    validate(cfg)


def test_overrides_reach_the_typed_config():
    cfg = compose_cfg("train", ["meta.inner_lr=0.05", "meta.outer_lr=0.001", "meta.inner_steps=3",
                                "trainer.precision=16", "data.heldout=[synth_5]"])
    assert cfg.meta.inner_lr == 0.05 and cfg.meta.inner_steps == 3
    assert cfg.trainer.precision == "16"  # an int on the command line becomes the declared str
    assert cfg.data.heldout == ["synth_5"]


@pytest.mark.parametrize("override,key", [
    ("meta.inner_lrr=0.1", "inner_lrr"),
    ("trainer.max_step=5", "max_step"),
    ("data.datasets.synth_0.domian=3", "domian"),
])
def test_misspelt_key_fails_naming_it(override, key):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as exc:
        compose_cfg("train", [override])
    assert key in str(exc.value) or key in str(exc.value.__cause__)


@pytest.mark.parametrize("override,key", [
    ("meta.inner_steps=two", "inner_steps"),
    ("meta.first_order=maybe", "first_order"),
    ("trainer.max_steps=1.5", "max_steps"),
])
def test_wrong_type_fails_naming_it(override, key):
    with pytest.raises((ConfigCompositionException, ValidationError)) as exc:
        compose_cfg("train", [override])
    assert key in str(exc.value) + str(exc.value.__cause__)


@pytest.mark.parametrize("override,message", [
    ("meta.algorithm=reptyle", "meta.algorithm='reptyle'"),
    ("meta.inner_lr=0", "meta.inner_lr=0"),
    ("meta.meta_batch=0", "meta.meta_batch=0"),
    ("data.heldout=[synth_0]", "both data.train and data.heldout"),
])
def test_semantic_errors_name_the_key(tiny_cfg, override, message, tmp_path):
    from metaseg.engine.training.trainer import train
    with pytest.raises(ConfigError, match=None) as exc:
        train(tiny_cfg(override), tmp_path)
    assert message in str(exc.value)
    assert not (tmp_path / "checkpoints").exists()
