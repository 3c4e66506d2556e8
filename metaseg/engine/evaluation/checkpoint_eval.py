"""``metaseg-eval``'s engine: a checkpoint (or a random-init baseline) through the held-out protocol.

With a checkpoint, the model, its label space and the adaptation defaults (alpha, K) come from
the checkpoint's own config (``metaseg/engine/load.py``, as for ``metaseg-predict``); ``data``
defaults to its mix. With ``checkpoint=none`` the
``model`` group is initialised at random (seeded by ``seed``) on the given ``data``'s label
space and fine-tuned on the same k shots, with ``eval.adapt_steps`` / ``eval.adapt_lr``
defaulting to the ``meta`` group: the baseline goes through exactly the protocol a meta-learned
(or ``erm``) checkpoint does, so one table compares like with like.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from metaseg.data.mix import build_mix
from metaseg.engine.evaluation import summary
from metaseg.engine.evaluation.baseline import evaluate_baseline
from metaseg.engine.evaluation.protocol import evaluate_heldout
from metaseg.engine.evaluation.report import CURVE_PNG, write_reports
from metaseg.engine.evaluation.settings import validate_eval
from metaseg.engine.evaluation.tune import tune_adaptation, tuned_settings
from metaseg.engine.load import NO_CHECKPOINT, adaptation_learner, is_baseline, load
from metaseg.meta.precision import Precision
from metaseg.utils.errors import ConfigError
from metaseg.utils.runtime import resolve_device, seed_everything, write_json

log = logging.getLogger(__name__)


def evaluate_checkpoint(cfg: Any, run_dir) -> dict:
    """Evaluate the checkpoint's (or the given) held-out datasets; write eval.json, eval.md, eval.csv, pictures/."""
    settings = validate_eval(cfg.eval)
    seed_everything(cfg.seed)
    baseline = is_baseline(cfg.checkpoint)
    source = load(None if baseline else str(cfg.checkpoint), cfg.data, own_data=True, data_root=cfg.data_root,
                  model=cfg.model, meta=cfg.meta, seed=cfg.seed)
    mix, head = source.mix, source.head
    device = resolve_device(cfg.device)
    learner = adaptation_learner(source.model.to(device), source.meta_cfg, Precision(cfg.precision, device.type),
                                 head, source.meta_state)
    eval_cfg, tuning = settings, None
    if cfg.eval.tune:  # adapt_lr and adapt_steps chosen on the training datasets' validation tasks (engine/tune.py)
        if head["kind"] == "new":
            raise ConfigError("eval.tune=true tunes on the checkpoint's own validation tasks, but the held-out "
                              "label space differs from the checkpoint's (new head); pass eval.adapt_lr and "
                              "eval.adapt_steps instead")
        val = build_mix(source.train_data, validation=True).val
        tuning = tune_adaptation(learner, val, mix.num_classes, settings, device, cfg.seed, mix.classes)
        eval_cfg = tuned_settings(settings, tuning)
    log.info("evaluating %s on %s: k in %s, %d episodes, %s mode", "a random init (checkpoint=none)" if baseline
             else cfg.checkpoint, list(mix.heldout), cfg.eval.shots, cfg.eval.episodes, cfg.eval.mode)
    result = evaluate_heldout(learner, mix.heldout, mix.num_classes, eval_cfg, device, cfg.seed, mix.classes)
    pictures, seconds = result.pictures, result.seconds
    result = dict(result)
    if tuning is not None:
        result["tune"] = tuning
    if cfg.eval.baseline and not baseline:  # the same episodes and adaptation from a random init of the model
        result[summary.KEY] = evaluate_baseline(
            lambda m: adaptation_learner(m, source.meta_cfg, Precision(cfg.precision, device.type), head),
            source.model_cfg, mix.heldout, mix.num_classes, eval_cfg, device, cfg.seed, mix.classes)
    result["seconds"] = seconds  # wall time per dataset (not reproducible, unlike everything else)
    result["head"] = head
    result["checkpoint"] = NO_CHECKPOINT if baseline else str(cfg.checkpoint)
    result["step"] = source.step
    result["seed"] = cfg.seed
    # the config as run: model and meta are the ones used (the checkpoint's, unless checkpoint=none)
    result["config"] = {**OmegaConf.to_container(cfg, resolve=True),
                        "model": OmegaConf.to_container(source.model_cfg, resolve=True),
                        "meta": OmegaConf.to_container(source.meta_cfg, resolve=True)}
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
