"""A run with encoder weights by name (smp's download served from local files: the ``hub`` fixture,
tests/conftest.py) records the normalisation it used. Loading them: tests/unit/test_pretrained_weights.py."""

from omegaconf import OmegaConf

from metaseg.engine.checkpoint import load_checkpoint
from metaseg.engine.training.trainer import train
from tests.helpers import HUB_STATS, TINY, compose_cfg


def test_a_run_with_named_weights_records_the_normalisation_it_used(hub, tmp_path):
    cfg = compose_cfg("train", [*TINY, "trainer.device=cpu", "trainer.max_steps=1", "trainer.eval_every=0",
                                "eval.episodes=1", "eval.pictures=0", "trainer.monitor_tasks=0",
                                "model.encoder_weights=imagenet"])
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")  # as Hydra writes it: data.mean null
    train(cfg, tmp_path)
    assert cfg.data.mean is None  # the caller's config is left as given
    recorded = OmegaConf.load(tmp_path / ".hydra" / "config.yaml")
    assert list(recorded.data.mean) == HUB_STATS["mean"] and list(recorded.data.std) == HUB_STATS["std"]
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["config"]["data"]["mean"] == HUB_STATS["mean"]
