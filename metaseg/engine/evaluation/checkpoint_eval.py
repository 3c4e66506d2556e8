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
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf, open_dict
from torch import nn

from metaseg.config import MetaConfig, TrainConfig
from metaseg.data.mix import build_mix, normalisation
from metaseg.engine.build import make_learner
from metaseg.engine.checkpoint import load_checkpoint
from metaseg.engine.evaluation import summary
from metaseg.engine.evaluation.baseline import evaluate_baseline, random_init
from metaseg.engine.evaluation.protocol import evaluate_heldout, validate_eval
from metaseg.engine.evaluation.report import CURVE_PNG, write_reports
from metaseg.engine.evaluation.tune import tune_adaptation, tuned_eval_cfg
from metaseg.engine.heads import NewHeadLearner, load_body
from metaseg.meta.precision import Precision
from metaseg.models.factory import build_model
from metaseg.models.weights import fill_normalisation
from metaseg.utils.errors import CheckpointError, ConfigError
from metaseg.utils.runtime import resolve_device, seed_everything, write_json

log = logging.getLogger(__name__)
NO_CHECKPOINT = "none"


def is_baseline(checkpoint: Any) -> bool:
    """``checkpoint=none``: a random-init model instead of a checkpoint."""
    return str(checkpoint).strip().lower() == NO_CHECKPOINT


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
        mean, std = normalisation(trained)  # a run records what it used; null only in hand-made configs
        if data_cfg.mean is not None and (list(data_cfg.mean) != mean or list(data_cfg.std or []) != std):
            log.info("normalising with the checkpoint's data.mean=%s data.std=%s", mean, std)
        data_cfg.mean, data_cfg.std = mean, std
    return data_cfg


def heldout_mix(data_cfg: Any):
    """The held-out datasets ``data_cfg`` names, built and checked."""
    if not data_cfg.heldout:
        raise ConfigError("no held-out dataset to evaluate: set data.heldout=[NAME,...]")
    return build_mix(data_cfg, need_train=False)


def read_checkpoint(path: Any) -> tuple[dict, Any]:
    """The checkpoint at ``path`` and its config merged into the training schema."""
    ckpt = load_checkpoint(path)
    try:
        train_cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), ckpt["config"])
    except Exception as exc:  # noqa: BLE001 - schema mismatch of an older/newer checkpoint
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint={path!r}: its config does not fit this metaseg: {first}") from exc
    missing = sorted(OmegaConf.missing_keys(train_cfg))  # what the schema cannot default: data, model, ...
    if missing:
        raise CheckpointError(f"checkpoint={path!r} has an incomplete config (no {', '.join(missing[:6])}), so its "
                              f"model cannot be rebuilt; use a checkpoint written by metaseg-train "
                              f"(<run dir>/checkpoints/last.pt or best.pt)")
    return ckpt, train_cfg


def state_dict_problem(exc: BaseException, limit: int = 240) -> str:
    """The first detail of torch's ``load_state_dict`` error (its first line only names the model)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)
    return detail if len(detail) <= limit else detail[: limit - 3] + "..."


def checkpoint_model(ckpt: dict, train_cfg: Any, classes: Sequence[str], path: str) -> tuple[nn.Module, dict]:
    """The checkpoint's model for the label space ``classes``, and the head record of ``eval.json``.

    Classes other than the checkpoint's keep its body and get a new head, initialised per
    episode from the support prototypes (``engine/heads.py``)."""
    trained = list(ckpt.get("classes") or train_cfg.data.classes)
    new_head = list(classes) != trained
    model = build_model(train_cfg.model, len(classes) if new_head else len(trained))
    if new_head:
        load_body(model, ckpt["model"], path)
        log.info("held-out classes %s differ from the checkpoint's %s: new head, initialised from each "
                 "episode's support prototypes, then adapted", list(classes), trained)
    else:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint={path!r}: weights do not fit its model config: "
                                  f"{state_dict_problem(exc)}") from exc
    head = {"kind": "new" if new_head else "checkpoint", "checkpoint_classes": trained,
            "init": "support prototypes (Proto-MAML)" if new_head else None}
    return model, head


def _from_checkpoint(cfg: Any):
    """(model with the checkpoint's weights, model config, meta config, mix, step, head record, meta state,
    the checkpoint's training data config)."""
    ckpt, train_cfg = read_checkpoint(cfg.checkpoint)
    if cfg.get("data_root"):  # the checkpoint's datasets, found under another folder (another machine)
        if cfg.data is not None:
            raise ConfigError(f"data_root={cfg.data_root} moves the checkpoint's own mix, but data= names another "
                              f"one: set its data.root instead")
        with open_dict(train_cfg):
            train_cfg.data.root = str(cfg.data_root)
    mix = heldout_mix(heldout_data(cfg.data, train_cfg.data))
    model, head = checkpoint_model(ckpt, train_cfg, mix.classes, str(cfg.checkpoint))
    return model, train_cfg.model, train_cfg.meta, mix, ckpt.get("step"), head, ckpt.get("meta_state"), train_cfg.data


def check_baseline(data_cfg: Any, model_cfg: Any) -> None:
    """What ``checkpoint=none`` needs: the data (its label space and size) and a model to initialise.

    ``data.mean``/``std`` left null are filled in ``data_cfg`` as training fills them (the named
    encoder weights' statistics, else 0.5/0.25), so the baseline sees images as a trained model would."""
    if data_cfg is None:
        raise ConfigError("checkpoint=none needs the data to evaluate: add data=NAME (e.g. data=synthetic)")
    if model_cfg is None:
        raise ConfigError("checkpoint=none needs a model to initialise: add model=NAME (e.g. model=unet_resnet18)")
    if not data_cfg.size:
        raise ConfigError("checkpoint=none has no checkpoint to take the image size from: set data.size=N")
    fill_normalisation(data_cfg, model_cfg)
    if len(data_cfg.mean) != model_cfg.in_channels:
        raise ConfigError(f"data.mean has {len(data_cfg.mean)} values but model.in_channels={model_cfg.in_channels}")


def baseline_meta(cfg: Any) -> Any:
    """``checkpoint=none``'s adaptation defaults: the ``meta`` group, or the schema's."""
    return cfg.meta if cfg.meta is not None else OmegaConf.structured(MetaConfig)


def _random_init(cfg: Any):
    """The ``checkpoint=none`` baseline: the ``model`` group at random init on ``data``'s label space."""
    check_baseline(cfg.data, cfg.model)
    mix = heldout_mix(cfg.data)
    model = random_init(cfg.model, mix.num_classes, cfg.seed)  # the model a checkpoint's baseline draws too
    return (model, cfg.model, baseline_meta(cfg), mix, None,
            {"kind": "random", "checkpoint_classes": None, "init": None}, None, cfg.data)


def adaptation_learner(model: nn.Module, meta_cfg: Any, precision: Precision, head: dict,
                       meta_state: Optional[dict] = None):
    """The learner that adapts ``model`` as ``meta_cfg`` says, with the checkpoint's learned state
    (Meta-SGD's step sizes, if any); a new head starts from the support prototypes."""
    learner = make_learner(model, meta_cfg, precision)
    learner.load_meta_state_dict(meta_state)
    return NewHeadLearner(learner) if head["kind"] == "new" else learner


def evaluate_checkpoint(cfg: Any, run_dir) -> dict:
    """Evaluate the checkpoint's (or the given) held-out datasets; write eval.json, eval.md, eval.csv, pictures/."""
    validate_eval(cfg.eval)
    seed_everything(cfg.seed)
    baseline = is_baseline(cfg.checkpoint)
    model, model_cfg, meta_cfg, mix, step, head, meta_state, train_data = \
        _random_init(cfg) if baseline else _from_checkpoint(cfg)
    device = resolve_device(cfg.device)
    learner = adaptation_learner(model.to(device), meta_cfg, Precision(cfg.precision, device.type), head,
                                 meta_state)
    eval_cfg, tuning = cfg.eval, None
    if cfg.eval.tune:  # adapt_lr and adapt_steps chosen on the training datasets' validation tasks (engine/tune.py)
        if head["kind"] == "new":
            raise ConfigError("eval.tune=true tunes on the checkpoint's own validation tasks, but the held-out "
                              "label space differs from the checkpoint's (new head); pass eval.adapt_lr and "
                              "eval.adapt_steps instead")
        val = build_mix(train_data, validation=True).val
        tuning = tune_adaptation(learner, val, mix.num_classes, cfg.eval, device, cfg.seed, mix.classes)
        eval_cfg = tuned_eval_cfg(cfg.eval, tuning)
    log.info("evaluating %s on %s: k in %s, %d episodes, %s mode", "a random init (checkpoint=none)" if baseline
             else cfg.checkpoint, list(mix.heldout), cfg.eval.shots, cfg.eval.episodes, cfg.eval.mode)
    result = evaluate_heldout(learner, mix.heldout, mix.num_classes, eval_cfg, device, cfg.seed, mix.classes)
    pictures, seconds = result.pictures, result.seconds
    result = dict(result)
    if tuning is not None:
        result["tune"] = tuning
    if cfg.eval.baseline and not baseline:  # the same episodes and adaptation from a random init of the model
        result[summary.KEY] = evaluate_baseline(
            lambda m: adaptation_learner(m, meta_cfg, Precision(cfg.precision, device.type), head), model_cfg,
            mix.heldout, mix.num_classes, eval_cfg, device, cfg.seed, mix.classes)
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
    reason = ("checkpoint=none: the model is the random init itself, so there is no baseline to set beside it."
              if baseline else None if cfg.eval.baseline else
              "eval.baseline=false: no random-init baseline beside these scores.")
    log.info("%s", summary.render(result, where_next(run_dir, result), model=summary.RANDOM if baseline else "trained",
                                  reason=reason))
    return result


def where_next(run_dir: Path, result: dict) -> list[tuple[str, str]]:
    """The summary's pointers: the run folder and its reports, the pictures."""
    folder = summary.shown_path(run_dir)
    out = [("run folder", f"{folder}  (eval.json, eval.csv, .hydra/config.yaml)"),
           ("tables", f"{summary.shown_path(run_dir / 'eval.md')}  (every metric, both reductions, per class)")]
    if result.get("pictures"):
        out.append(("pictures", "  ".join(summary.shown_path(run_dir / p) for p in result["pictures"].values())))
    if (run_dir / CURVE_PNG).is_file():
        out.append(("curve", summary.shown_path(run_dir / CURVE_PNG)))
    return out
