"""``metaseg-eval``'s engine: a checkpoint (or a random-init baseline) through the held-out protocol.

With a checkpoint, the model, its label space and the adaptation defaults (alpha, K) come from
the checkpoint's own config; ``data`` defaults to its mix. With ``checkpoint=none`` the
``model`` group is initialised at random (seeded by ``seed``) on the given ``data``'s label
space and fine-tuned on the same k shots, with ``eval.adapt_steps`` / ``eval.adapt_lr``
defaulting to the ``meta`` group: the baseline goes through exactly the protocol a meta-learned
(or ``erm``) checkpoint does, so one table compares like with like.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf, open_dict

from metaseg.config import MetaConfig, TrainConfig
from metaseg.data.mix import build_mix
from metaseg.engine.build import make_learner
from metaseg.engine.checkpoint import load_checkpoint
from metaseg.engine.eval_report import write_reports
from metaseg.engine.evaluate import evaluate_heldout, validate_eval
from metaseg.engine.heads import NewHeadLearner, load_body
from metaseg.engine.tune import tune_adaptation, tuned_eval_cfg
from metaseg.meta.precision import Precision
from metaseg.models.factory import build_model
from metaseg.utils.errors import CheckpointError, ConfigError
from metaseg.utils.runtime import resolve_device, seed_everything, write_json

log = logging.getLogger(__name__)
NO_CHECKPOINT = "none"


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


def _held_out_mix(data_cfg: Any):
    if not data_cfg.heldout:
        raise ConfigError("no held-out dataset to evaluate: set data.heldout=[NAME,...]")
    return build_mix(data_cfg, need_train=False)


def _from_checkpoint(cfg: Any):
    """(model with the checkpoint's weights, model config, meta config, mix, step, head record, meta state).

    Held-out data with a label space of its own keep the checkpoint's body and get a new head,
    initialised per episode from the support prototypes (``engine/heads.py``)."""
    ckpt = load_checkpoint(cfg.checkpoint)
    try:
        train_cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), ckpt["config"])
    except Exception as exc:  # noqa: BLE001 - schema mismatch of an older/newer checkpoint
        raise CheckpointError(f"checkpoint={cfg.checkpoint!r}: its config does not fit this metaseg: {exc}") from exc
    mix = _held_out_mix(heldout_data(cfg.data, train_cfg.data))
    classes = list(ckpt.get("classes") or train_cfg.data.classes)
    new_head = list(mix.classes) != classes
    model = build_model(train_cfg.model, mix.num_classes if new_head else len(classes))
    if new_head:
        load_body(model, ckpt["model"], str(cfg.checkpoint))
        log.info("held-out classes %s differ from the checkpoint's %s: new head, initialised from each "
                 "episode's support prototypes, then adapted", mix.classes, classes)
    else:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint={cfg.checkpoint!r}: weights do not fit its model config: "
                                  f"{str(exc).splitlines()[0]}") from exc
    head = {"kind": "new" if new_head else "checkpoint", "checkpoint_classes": classes,
            "init": "support prototypes (Proto-MAML)" if new_head else None}
    return model, train_cfg.model, train_cfg.meta, mix, ckpt.get("step"), head, ckpt.get("meta_state"), train_cfg.data


def _random_init(cfg: Any):
    """The ``checkpoint=none`` baseline: the ``model`` group at random init on ``data``'s label space."""
    if cfg.data is None:
        raise ConfigError("checkpoint=none needs the data to evaluate: add data=NAME (e.g. data=synthetic)")
    if cfg.model is None:
        raise ConfigError("checkpoint=none needs a model to initialise: add model=NAME (e.g. model=unet_resnet18)")
    if not cfg.data.size:
        raise ConfigError("checkpoint=none has no checkpoint to take the image size from: set data.size=N")
    if len(cfg.data.mean) != cfg.model.in_channels:
        raise ConfigError(f"data.mean has {len(cfg.data.mean)} values but model.in_channels={cfg.model.in_channels}")
    mix = _held_out_mix(cfg.data)
    model = build_model(cfg.model, mix.num_classes)
    meta = cfg.meta if cfg.meta is not None else OmegaConf.structured(MetaConfig)
    return model, cfg.model, meta, mix, None, {"kind": "random", "checkpoint_classes": None, "init": None}, None, \
        cfg.data


def evaluate_checkpoint(cfg: Any, run_dir) -> dict:
    """Evaluate the checkpoint's (or the given) held-out datasets; write eval.json, eval.md, eval.csv, pictures/."""
    validate_eval(cfg.eval)
    seed_everything(cfg.seed)
    baseline = str(cfg.checkpoint).strip().lower() == NO_CHECKPOINT
    model, model_cfg, meta_cfg, mix, step, head, meta_state, train_data = \
        _random_init(cfg) if baseline else _from_checkpoint(cfg)
    device = resolve_device(cfg.device)
    learner = make_learner(model.to(device), meta_cfg, Precision(cfg.precision, device.type))
    learner.load_meta_state_dict(meta_state)  # Meta-SGD's learned step sizes, if any
    eval_cfg, tuning = cfg.eval, None
    if cfg.eval.tune:  # adapt_lr and adapt_steps chosen on the training datasets' validation tasks (engine/tune.py)
        if head["kind"] == "new":
            raise ConfigError("eval.tune=true tunes on the checkpoint's own validation tasks, but the held-out "
                              "label space differs from the checkpoint's (new head); pass eval.adapt_lr and "
                              "eval.adapt_steps instead")
        val = build_mix(train_data, validation=True).val
        tuning = tune_adaptation(learner, val, mix.num_classes, cfg.eval, device, cfg.seed, mix.classes)
        eval_cfg = tuned_eval_cfg(cfg.eval, tuning)
    if head["kind"] == "new":
        learner = NewHeadLearner(learner)
    log.info("evaluating %s on %s: k in %s, %d episodes, %s mode", "a random init (checkpoint=none)" if baseline
             else cfg.checkpoint, list(mix.heldout), cfg.eval.shots, cfg.eval.episodes, cfg.eval.mode)
    result = evaluate_heldout(learner, mix.heldout, mix.num_classes, eval_cfg, device, cfg.seed, mix.classes)
    pictures, seconds = result.pictures, result.seconds
    result = dict(result)
    if tuning is not None:
        result["tune"] = tuning
    result["seconds"] = seconds  # wall time per dataset (not reproducible, unlike everything else)
    result["head"] = head
    result["checkpoint"] = NO_CHECKPOINT if baseline else str(cfg.checkpoint)
    result["step"] = step
    result["seed"] = cfg.seed
    # the config as run: model and meta are the ones used (the checkpoint's, unless checkpoint=none)
    result["config"] = {**OmegaConf.to_container(cfg, resolve=True),
                        "model": OmegaConf.to_container(model_cfg, resolve=True),
                        "meta": OmegaConf.to_container(meta_cfg, resolve=True)}
    run_dir = Path(run_dir)
    result["pictures"] = write_reports(result, pictures, run_dir)
    write_json(run_dir / "eval.json", result)
    log.info("wrote %s, eval.md, eval.csv and %d picture(s)", run_dir / "eval.json", len(pictures))
    return result
