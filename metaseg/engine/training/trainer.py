"""The outer loop: sample tasks, adapt, average the query losses, step theta; evaluate; save.

``train(cfg, run_dir)`` is a plain function of a composed config so that the Hydra entry
point, the tests and sweepers all run the same code; it returns the final metrics, whose
``objective`` (the held-out metric ``trainer.best_metric``, mean adapted mIoU by default) is
what a sweeper optimises. Under torchrun every process runs it (``metaseg.engine.distributed``):
each adapts its share of the meta-batch, gradients are summed before the one outer step,
and only rank 0 writes. A run killed at any point continues exactly with
``trainer.resume=auto`` (see ``metaseg.engine.state``); evaluation and monitoring never move
the training's random streams, so the order of the work below is free to change.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter

from metaseg.engine import distributed
from metaseg.engine.checkpoint import BEST, LAST, checkpoint_dir, claim_run_dir, resume_training, save_checkpoint
from metaseg.engine.evaluation import summary
from metaseg.engine.evaluation.baseline import evaluate_baseline
from metaseg.engine.evaluation.protocol import PATCH_MODE_FIX, evaluate_heldout
from metaseg.engine.evaluation.report import CURVE_PNG, has_curves, plot_curves
from metaseg.engine.evaluation.results import Results
from metaseg.engine.evaluation.settings import validate_eval
from metaseg.engine.evaluation.tune import tune_adaptation, tuned_settings
from metaseg.engine.evaluation.validation import evaluate_validation, log_validation
from metaseg.engine.state import capture, honours_determinism, kill_if_requested, rng_isolated
from metaseg.engine.training.best import BestTracker
from metaseg.engine.training.budget import Budget, write_budget
from metaseg.engine.training.monitor import InnerLoopMonitor, outer_grad_norm, progress
from metaseg.engine.training.setup import build_run
from metaseg.engine.training.stages import STAGE_DIR, pretrain_stage
from metaseg.meta.from_config import make_learner, validate_meta
from metaseg.meta.precision import Precision
from metaseg.meta.safety import DivergenceWatch
from metaseg.models.weights import fill_normalisation, weights_normalisation
from metaseg.utils.errors import ConfigError
from metaseg.utils.runtime import atomic_write, resolve_device, write_json

log = logging.getLogger(__name__)
HELDOUT_EVALS = ("always", "final")  # trainer.eval_heldout: which evaluations score the held-out datasets


def validate(cfg: Any) -> None:
    """Checks the schema cannot express: allowed values and cross-field constraints."""
    m, t, e = cfg.meta, cfg.trainer, cfg.eval
    validate_meta(m)
    for key, value, low in (("meta.inner_steps", m.inner_steps, 0), ("meta.meta_batch", m.meta_batch, 1),
                            ("trainer.max_steps", t.max_steps, 1), ("trainer.log_every", t.log_every, 1),
                            ("trainer.ckpt_every", t.ckpt_every, 1), ("trainer.eval_every", t.eval_every, 0),
                            ("data.size", cfg.data.size, 8)):
        if value < low:
            raise ConfigError(f"{key}={value} must be >= {low}")
    settings = validate_eval(e)
    if cfg.data.get("patches") and cfg.data.heldout and e.mode != "slide":
        raise ConfigError(PATCH_MODE_FIX)
    for key, value in (("meta.inner_lr", m.inner_lr), ("meta.outer_lr", m.outer_lr)):
        if not value > 0:
            raise ConfigError(f"{key}={value} must be > 0")
    if t.eval_heldout not in HELDOUT_EVALS:
        raise ConfigError(f"trainer.eval_heldout={t.eval_heldout!r} is not one of {', '.join(HELDOUT_EVALS)}")
    if t.eval_heldout == "final" and t.eval_every and not t.best_metric.startswith("val."):
        raise ConfigError(f"trainer.eval_heldout=final scores held-out datasets at the last evaluation only, so "
                          f"trainer.best_metric={t.best_metric!r} cannot be read before it: pick a validation "
                          f"metric (val.{t.best_metric}) or trainer.eval_heldout=always")
    if t.best_mode not in ("max", "min"):
        raise ConfigError(f"trainer.best_mode={t.best_mode!r} is not one of max, min")
    if t.best_metric.removeprefix("val.").startswith("mean.adapted") and not settings.episode_shots:
        raise ConfigError(f"trainer.best_metric={t.best_metric!r} needs adapted scores, but eval.shots={e.shots} "
                          f"and eval.episodes={e.episodes}: raise both to >= 1 or pick trainer.best_metric="
                          f"mean.zero_shot_miou")
    if t.patience is not None and (t.patience < 1 or not t.eval_every):
        raise ConfigError(f"trainer.patience={t.patience} needs a value >= 1 and trainer.eval_every > 0 "
                          f"(evaluations to wait), or null")
    if t.monitor_tasks < 0:
        raise ConfigError(f"trainer.monitor_tasks={t.monitor_tasks} must be >= 0")
    if (cfg.data.mean is None) != (cfg.data.std is None):
        raise ConfigError(f"data.mean={cfg.data.mean} and data.std={cfg.data.std}: set both, or neither (null: the "
                          f"named encoder weights' statistics, else 0.5/0.25)")
    if cfg.data.mean is not None and (len(cfg.data.mean) != cfg.model.in_channels
                                      or len(cfg.data.std) != cfg.model.in_channels):
        raise ConfigError(
            f"data.mean and data.std need model.in_channels={cfg.model.in_channels} values, "
            f"got {len(cfg.data.mean)} and {len(cfg.data.std)}"
        )


def settle_normalisation(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """``cfg`` with ``data.mean``/``std`` resolved where null (the named encoder weights' statistics, else
    0.5/0.25), also written into the run's ``.hydra/config.yaml``, so both record what was used."""
    if cfg.data.mean is not None and cfg.data.std is not None:
        return cfg
    cfg = copy.deepcopy(cfg)  # the caller's config stays as given
    fill_normalisation(cfg.data, cfg.model)
    hydra_cfg = run_dir / ".hydra" / "config.yaml"
    if hydra_cfg.is_file():
        recorded = OmegaConf.load(hydra_cfg)
        if OmegaConf.select(recorded, "data") is not None:
            recorded.data.mean, recorded.data.std = list(cfg.data.mean), list(cfg.data.std)
            atomic_write(hydra_cfg, lambda tmp: OmegaConf.save(recorded, tmp))
    return cfg


def _log_eval(writer: SummaryWriter, result: dict, step: int) -> None:
    """Held-out scores (both reductions, every k) and the picture grids, as evaluate_heldout returns them."""
    for name, res in Results.from_dict(result).datasets.items():
        for key in ("miou", "mf1"):
            writer.add_scalar(f"heldout/{name}/zero_shot_{key}", res.zero_shot.get(key), step)
            writer.add_scalar(f"heldout/{name}/zero_shot_image_{key}", res.zero_shot.get(key, "image"), step)
            if res.adapted:
                writer.add_scalar(f"heldout/{name}/adapted_{key}", res.first.get(key).mean, step)
                writer.add_scalar(f"heldout/{name}/adapted_image_{key}", res.first.get(key, "image").mean, step)
                for k, shot in res.adapted.items():
                    writer.add_scalar(f"heldout/{name}/{k}shot_{key}", shot.get(key).mean, step)
    for name, grid in getattr(result, "pictures", {}).items():
        writer.add_image(f"predictions/{name}", grid, step)


def stop_early(trainer_cfg, best: BestTracker, step: int) -> bool:
    """``trainer.patience`` evaluations have passed since the best one (restartable: reads the tracker)."""
    if not trainer_cfg.patience or best.step is None:
        return False
    return (step - best.step) >= trainer_cfg.patience * trainer_cfg.eval_every


@honours_determinism
def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Meta-train as ``cfg`` says, writing checkpoints, tensorboard and metrics under ``run_dir``."""
    run_dir = Path(run_dir)
    validate(cfg)
    weights_normalisation(cfg.model)  # named weights: offline and not cached stops here, before any data is read
    # one run per folder, locked while it lives (torchrun's RANK: rank 0 locks for all, before the group forms)
    lock = claim_run_dir(run_dir, cfg.trainer, (STAGE_DIR,)) if os.environ.get("RANK", "0") == "0" else None
    try:
        cfg = settle_normalisation(cfg, run_dir)  # before the data is built, and before the config is checkpointed
        cfg = pretrain_stage(cfg, run_dir, train)  # pretrain.steps: a first stage, then meta.init_from its weights
        if cfg.trainer.threads:
            torch.set_num_threads(cfg.trainer.threads)
        device = resolve_device(cfg.trainer.device)
        ctx = distributed.setup(device)  # torchrun: join the group, take cuda:LOCAL_RANK; else one process
        try:
            return _train(cfg, ctx, Path(distributed.broadcast(str(run_dir))))  # rank 0's folder for all
        finally:
            ctx.close()
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: DictConfig, ctx: distributed.Context, run_dir: Path) -> dict:
    device = ctx.device
    distributed.check_meta_batch(cfg.meta.meta_batch, ctx.world_size)
    distributed.quiet_logging(ctx)
    meta = cfg.meta
    settings = validate_eval(cfg.eval)  # every evaluation below reads the eval block as these typed settings
    run = build_run(cfg, ctx)  # seeded: datasets, task sampler, model, learner, optimizer (engine/training/setup.py)
    mix, sampler, model, learner = run.mix, run.sampler, run.model, run.learner
    optimizer, scaler, precision = run.optimizer, run.scaler, run.precision
    resolved = OmegaConf.to_container(cfg, resolve=True)
    best = BestTracker(cfg.trainer.best_metric, cfg.trainer.best_mode)
    budget = Budget(model)  # images through forward/backward passes and seconds of the outer steps
    # Everything a checkpoint restores; an algorithm with state of its own adds an entry here.
    # The learner's own state (Meta-SGD's step sizes) loads before the optimizer that updates it.
    stateful = {"model": model, "meta_state": learner, "optimizer": optimizer, "scaler": scaler,
                "sampler": sampler, "best": best, "budget": budget}
    monitor = InnerLoopMonitor(sampler, cfg.trainer.monitor_tasks, cfg.seed, device) \
        if cfg.trainer.monitor_tasks and ctx.main else None
    start_step = resume_training(cfg.trainer, run_dir, resolved, stateful)  # every rank reads the same file
    distributed.offset_streams(cfg.seed, start_step, ctx.rank)
    distributed.broadcast_tensors([*learner.parameters(), *model.buffers()])
    watch = DivergenceWatch.of(learner)  # losses or weights grown by orders of magnitude stop the run
    log.info("%s-training %s on %s, held out %s; %d outer steps of %d tasks, K=%d, alpha=%g, beta=%g, "
             "%s order, precision %s, device %s", learner.name, cfg.model.arch + "-" + cfg.model.encoder,
             list(mix.train), list(mix.heldout), cfg.trainer.max_steps, meta.meta_batch, meta.inner_steps,
             meta.inner_lr, meta.outer_lr, "first" if learner.is_first_order(cfg.trainer.max_steps) else "second",
             precision.mode, device)
    if ctx.world_size > 1:
        log.info("%d processes (backend %s), %d of the %d tasks of each step on rank 0", ctx.world_size,
                 distributed.backend_for(device), len(sampler.share(meta.meta_batch)), meta.meta_batch)
    # purge_step: a resumed run drops the events the killed one logged after its checkpoint
    writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None) \
        if ctx.main else None

    def main_only(fn):  # checkpoints and tensorboard: rank 0 writes, the others skip
        return fn if ctx.main else (lambda *args, **kwargs: None)

    @main_only
    def checkpoint(step: int, *names: str) -> None:
        if not names:
            return
        state = capture(stateful)
        for name in names:
            save_checkpoint(checkpoint_dir(run_dir) / name, **state, step=step, config=resolved, classes=mix.classes)

    def evaluate(step: int, final: bool = False) -> dict:
        with rng_isolated():
            # intermediate evaluations pick best.pt: the adaptation curve only once, at the end
            eval_cfg = settings if final else settings.without_curve()
            if final and cfg.eval.tune:  # the final held-out scores with adaptation tuned on validation tasks
                tuning = tune_adaptation(learner, mix.val, mix.num_classes, settings, device, cfg.seed, mix.classes)
                eval_cfg = tuned_settings(settings, tuning)
            heldout = mix.heldout if final or cfg.trainer.eval_heldout == "always" else {}
            result = evaluate_heldout(learner, heldout, mix.num_classes, eval_cfg, device, cfg.seed, mix.classes)
            if final and cfg.eval.tune:
                result["tune"] = tuning
            if final and cfg.eval.baseline and heldout:  # the same episodes and adaptation from a random init
                result[summary.KEY] = evaluate_baseline(  # its own Precision: fp16's scale is state
                    lambda m: make_learner(m, meta, Precision(precision.mode, device.type)), cfg.model, heldout,
                    mix.num_classes, eval_cfg, device, cfg.seed, mix.classes)
            if writer is not None:
                _log_eval(writer, result, step)  # with the evaluation's own picture grids (eval.pictures)
            if mix.val:
                result["val"] = evaluate_validation(learner, mix.val, mix.num_classes, settings, device, cfg.seed,
                                                    mix.classes)
                if writer is not None:
                    log_validation(writer, result["val"], step)
        return result

    t0 = time.perf_counter()
    budget.start_clock()  # budget.json's seconds: this process's time added to the earlier sittings'
    step = start_step
    try:
        bar = progress(start_step, cfg.trainer.max_steps)
        for step in bar:
            log_now = step % cfg.trainer.log_every == 0 or step == cfg.trainer.max_steps
            # one outer step of the algorithm (metaseg/meta/base.py): tasks, inner loops, theta update
            with budget.counting():
                stats = learner.meta_step(sampler, optimizer, scaler, step, device=device, log=log_now)
            watch.check(step, stats)  # a diverged step stops here, before it can be evaluated or saved

            if log_now and writer is not None:
                elapsed = time.perf_counter() - t0
                for key, value in stats.items():
                    if key != "grad_norm":  # the meta-gradient's norm is train/outer_grad_norm, below
                        writer.add_scalar(f"train/{key}", value, step)
                writer.add_scalar("train/tasks_per_second", (step - start_step) * meta.meta_batch / elapsed, step)
                # after scaler.step the gradients are unscaled (GradScaler unscales in place under fp16)
                writer.add_scalar("train/outer_grad_norm", outer_grad_norm(model.parameters()), step)
                writer.add_scalar("train/beta", optimizer.param_groups[0]["lr"], step)
                if monitor is not None:
                    with rng_isolated():
                        for k, loss_k in enumerate(monitor.query_losses(learner)):
                            writer.add_scalar(f"monitor/query_loss_after_{k}_steps", loss_k, step)
                outer, before = stats.get("outer_loss", float("nan")), stats.get("query_loss_before", float("nan"))
                bar.set_postfix(outer=f"{outer:.3f}", before=f"{before:.3f}")
                log.info("step %d/%d  outer %.4f  query before %.4f  after %.4f  (%.1fs)", step,
                         cfg.trainer.max_steps, outer, before, stats.get("query_loss_after", float("nan")), elapsed)
            # evaluate before saving, so a checkpoint's best-so-far includes this step's score
            improved = False
            if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0 and step != cfg.trainer.max_steps:
                improved = bool(mix.heldout or mix.val) and best.update(evaluate(step), step)
                if not improved and stop_early(cfg.trainer, best, step):
                    log.info("no better %s for %s evaluations: stopping early at step %d",
                             best.metric, cfg.trainer.patience, step)
                    break  # the final evaluation and checkpoint below run at this step
            due = step % cfg.trainer.ckpt_every == 0 and step != cfg.trainer.max_steps
            checkpoint(step, *([LAST] if due else []), *([BEST] if improved else []))
            kill_if_requested(step)

        else:
            step = cfg.trainer.max_steps
        result, improved = evaluate(step, final=True), False
        try:
            improved = bool(mix.heldout or mix.val) and best.update(result, step)
        finally:  # the final weights are kept even when trainer.best_metric names no result key
            checkpoint(step, LAST, *([BEST] if improved else []))
    finally:
        if writer is not None:
            writer.close()
    seconds = time.perf_counter() - t0
    # metrics.json holds only what the seed and config determine: two runs give identical files
    metrics = {"step": step, **result, "best": best.summary()}
    metrics["objective"] = best.value_of(result) if mix.heldout or mix.val else float("nan")
    distributed.barrier()  # every rank has finished before rank 0 reports the run done
    if not ctx.main:
        return {**metrics, "seconds": seconds}
    spent = write_budget(run_dir, budget, budget.seconds,
                         {STAGE_DIR: run_dir / STAGE_DIR} if cfg.pretrain.steps else {})
    metrics["budget"] = {k: v for k, v in spent["total"].items() if not k.endswith("seconds")}
    write_json(run_dir / "metrics.json", metrics)
    if has_curves(result):
        plot_curves(result, run_dir / CURVE_PNG)
    write_json(run_dir / "timing.json", {"seconds": seconds, "resumed_from_step": start_step,
                                         "processes": ctx.world_size,
                                         "steps_per_second": (step - start_step) / seconds if seconds else None})
    log.info("wrote %s", run_dir / "metrics.json")
    log.info("%s", summary.render(metrics, where_next(run_dir),
                                  reason=None if cfg.eval.baseline or not mix.heldout else
                                  "eval.baseline=false: no random-init baseline beside these scores."))
    return {**metrics, "seconds": seconds}


def where_next(run_dir: Path) -> list[tuple[str, str]]:
    """The summary's pointers: the run folder, its tensorboard (curves and pictures), the checkpoint to evaluate."""
    folder = summary.shown_path(run_dir)
    best = checkpoint_dir(run_dir) / BEST
    ckpt = summary.shown_path(best if best.is_file() else checkpoint_dir(run_dir) / LAST)
    out = [("run folder", f"{folder}  (metrics.json, checkpoints/, the log, .hydra/config.yaml)"),
           ("tensorboard", f"tensorboard --logdir {folder}  (SCALARS: train/, heldout/, val/; "
                           f"IMAGES: predictions/, the held-out pictures)")]
    if (run_dir / CURVE_PNG).is_file():
        out.append(("curve", f"{summary.shown_path(run_dir / CURVE_PNG)}  (held-out score against adaptation steps)"))
    out.append(("evaluate", f"metaseg-eval checkpoint={ckpt}  (eval.md, eval.csv, pictures/; "
                            f"eval.shots=[1,5,10] for more k)"))
    return out
