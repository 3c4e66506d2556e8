"""A run saved before a new config key existed resumes when the key is at its default (a study
spans sittings and versions); a changed value or a key at another value still refuses."""

from __future__ import annotations

from metaseg.engine.checkpoint import config_differences
from tests.helpers import compose_cfg
from omegaconf import OmegaConf


def _current(*overrides):
    return OmegaConf.to_container(compose_cfg("train", ["experiment=smoke", *overrides]), resolve=True)


def test_a_key_added_at_its_default_is_no_difference():
    current = _current()
    saved = OmegaConf.to_container(OmegaConf.create(current))
    del saved["trainer"]["eval_heldout"], saved["data"]["augment"]["zoom"]
    del saved["data"]["datasets"]["synth_0"]["scale"]
    assert config_differences(saved, current) == []


def test_a_key_added_away_from_its_default_and_a_changed_value_are_differences():
    current = _current("trainer.eval_heldout=final", "meta.inner_lr=0.05", "trainer.best_metric=val.mean.adapted_miou")
    saved = OmegaConf.to_container(OmegaConf.create(current))
    del saved["trainer"]["eval_heldout"]
    saved["meta"]["inner_lr"] = 0.1
    keys = [k for k, _, _ in config_differences(saved, current)]
    assert keys == ["meta.inner_lr", "trainer.eval_heldout"]
