"""``metaseg-eval``'s engine: a checkpoint, rebuilt from its own config, through the held-out protocol."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from metaseg.config import TrainConfig
from metaseg.data.mix import build_mix
from metaseg.engine.build import make_learner
from metaseg.engine.checkpoint import load_checkpoint
from metaseg.engine.evaluate import evaluate_heldout
from metaseg.meta.precision import Precision
from metaseg.models.factory import build_model
from metaseg.utils.errors import CheckpointError, ConfigError
from metaseg.utils.runtime import resolve_device, seed_everything, write_json

log = logging.getLogger(__name__)


def evaluate_checkpoint(cfg: Any, run_dir) -> dict:
    """Load a checkpoint, evaluate its (or the given) held-out datasets, write ``eval.json``."""
    seed_everything(cfg.seed)
    ckpt = load_checkpoint(cfg.checkpoint)
    try:
        train_cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), ckpt["config"])
    except Exception as exc:  # noqa: BLE001 - schema mismatch of an older/newer checkpoint
        raise CheckpointError(f"checkpoint={cfg.checkpoint!r}: its config does not fit this metaseg: {exc}") from exc
    data_cfg = cfg.data if cfg.data is not None else train_cfg.data
    if not data_cfg.heldout:
        raise ConfigError("no held-out dataset to evaluate: set data.heldout=[NAME,...]")
    mix = build_mix(data_cfg, need_train=False)
    classes = list(ckpt.get("classes") or train_cfg.data.classes)
    if len(mix.classes) != len(classes):
        raise ConfigError(
            f"data.classes has {len(mix.classes)} classes but the checkpoint's head predicts {len(classes)} "
            f"({classes}); evaluate on data with the checkpoint's label space")
    device = resolve_device(cfg.device)
    model = build_model(train_cfg.model, len(classes))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint={cfg.checkpoint!r}: weights do not fit its model config: "
                              f"{str(exc).splitlines()[0]}") from exc
    learner = make_learner(model.to(device), train_cfg.meta, Precision(cfg.precision, device.type))
    learner.load_meta_state_dict(ckpt.get("meta_state"))  # Meta-SGD's learned step sizes, if any
    result = evaluate_heldout(learner, mix.heldout, mix.num_classes, cfg.eval, device, cfg.seed, mix.classes)
    result["checkpoint"] = str(cfg.checkpoint)
    result["step"] = ckpt.get("step")
    result["config"] = OmegaConf.to_container(cfg, resolve=True)
    write_json(Path(run_dir) / "eval.json", result)
    log.info("wrote %s", Path(run_dir) / "eval.json")
    return result
