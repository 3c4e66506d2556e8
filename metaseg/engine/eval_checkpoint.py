"""``metaseg-eval``'s engine: a checkpoint, rebuilt from its own config, through the held-out protocol."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf, open_dict

from metaseg.config import TrainConfig
from metaseg.data.mix import build_mix
from metaseg.engine.build import make_learner
from metaseg.engine.checkpoint import load_checkpoint
from metaseg.engine.evaluate import evaluate_heldout
from metaseg.engine.heads import NewHeadLearner, load_body
from metaseg.meta.precision import Precision
from metaseg.models.factory import build_model
from metaseg.utils.errors import CheckpointError, ConfigError
from metaseg.utils.runtime import resolve_device, seed_everything, write_json

log = logging.getLogger(__name__)


def heldout_data(data_cfg: Any, trained: Any) -> Any:
    """The data to evaluate: ``data_cfg`` (the checkpoint's own mix when null), normalised with the
    checkpoint's mean/std (the statistics its model was trained with) and, where ``data.size`` is
    0 (``data=folder``), at the checkpoint's size."""
    if data_cfg is None:
        return trained
    data_cfg = copy.deepcopy(data_cfg)
    with open_dict(data_cfg):
        if not data_cfg.size:
            data_cfg.size = trained.size
        if list(data_cfg.mean) != list(trained.mean) or list(data_cfg.std) != list(trained.std):
            log.info("normalising with the checkpoint's data.mean=%s data.std=%s", list(trained.mean),
                     list(trained.std))
        data_cfg.mean, data_cfg.std = list(trained.mean), list(trained.std)
    return data_cfg


def evaluate_checkpoint(cfg: Any, run_dir) -> dict:
    """Load a checkpoint, evaluate its (or the given) held-out datasets, write ``eval.json``."""
    seed_everything(cfg.seed)
    ckpt = load_checkpoint(cfg.checkpoint)
    try:
        train_cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), ckpt["config"])
    except Exception as exc:  # noqa: BLE001 - schema mismatch of an older/newer checkpoint
        raise CheckpointError(f"checkpoint={cfg.checkpoint!r}: its config does not fit this metaseg: {exc}") from exc
    data_cfg = heldout_data(cfg.data, train_cfg.data)
    if not data_cfg.heldout:
        raise ConfigError("no held-out dataset to evaluate: set data.heldout=[NAME,...]")
    mix = build_mix(data_cfg, need_train=False)
    classes = list(ckpt.get("classes") or train_cfg.data.classes)
    new_head = list(mix.classes) != classes
    device = resolve_device(cfg.device)
    model = build_model(train_cfg.model, mix.num_classes if new_head else len(classes))
    if new_head:
        # a label space of its own: the checkpoint's body, a head built per episode (engine/heads.py)
        load_body(model, ckpt["model"], str(cfg.checkpoint))
        log.info("held-out classes %s differ from the checkpoint's %s: new head, initialised from each "
                 "episode's support prototypes, then adapted", mix.classes, classes)
    else:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint={cfg.checkpoint!r}: weights do not fit its model config: "
                                  f"{str(exc).splitlines()[0]}") from exc
    learner = make_learner(model.to(device), train_cfg.meta, Precision(cfg.precision, device.type))
    if new_head:
        learner = NewHeadLearner(learner)
    result = evaluate_heldout(learner, mix.heldout, mix.num_classes, cfg.eval, device, cfg.seed, mix.classes)
    result["head"] = {"kind": "new" if new_head else "checkpoint", "checkpoint_classes": classes,
                      "init": "support prototypes (Proto-MAML)" if new_head else None}
    result["checkpoint"] = str(cfg.checkpoint)
    result["step"] = ckpt.get("step")
    result["config"] = OmegaConf.to_container(cfg, resolve=True)
    write_json(Path(run_dir) / "eval.json", result)
    log.info("wrote %s", Path(run_dir) / "eval.json")
    return result
