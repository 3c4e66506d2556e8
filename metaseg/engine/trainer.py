"""The outer loop: sample tasks, adapt, average the query losses, step theta; evaluate; save.

``train(cfg, run_dir)`` is a plain function of a composed config so that the Hydra entry
point, the tests and sweepers all run the same code; it returns the final metrics, whose
``objective`` (mean adapted held-out mIoU) is what a sweeper optimises.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from metaseg.data.mix import build_mix
from metaseg.data.tasks import TaskSampler
from metaseg.engine.build import make_learner, validate_meta
from metaseg.engine.checkpoint import save_checkpoint
from metaseg.engine.evaluate import evaluate_heldout
from metaseg.meta.precision import Precision
from metaseg.models.factory import build_model
from metaseg.utils.errors import ConfigError
from metaseg.utils.runtime import resolve_device, seed_everything, write_json

log = logging.getLogger(__name__)


def validate(cfg: Any) -> None:
    """Checks the schema cannot express: allowed values and cross-field constraints."""
    m, t, e = cfg.meta, cfg.trainer, cfg.eval
    validate_meta(m)
    for key, value, low in (("meta.inner_steps", m.inner_steps, 0), ("meta.meta_batch", m.meta_batch, 1),
                            ("trainer.max_steps", t.max_steps, 1), ("trainer.log_every", t.log_every, 1),
                            ("trainer.ckpt_every", t.ckpt_every, 1), ("trainer.eval_every", t.eval_every, 0),
                            ("eval.episodes", e.episodes, 0), ("eval.shots", e.shots, 0),
                            ("eval.batch_size", e.batch_size, 1), ("data.size", cfg.data.size, 8)):
        if value < low:
            raise ConfigError(f"{key}={value} must be >= {low}")
    for key, value in (("meta.inner_lr", m.inner_lr), ("meta.outer_lr", m.outer_lr)):
        if not value > 0:
            raise ConfigError(f"{key}={value} must be > 0")
    if len(cfg.data.mean) != cfg.model.in_channels or len(cfg.data.std) != cfg.model.in_channels:
        raise ConfigError(
            f"data.mean and data.std need model.in_channels={cfg.model.in_channels} values, "
            f"got {len(cfg.data.mean)} and {len(cfg.data.std)}"
        )


def _log_eval(writer: SummaryWriter, result: dict, step: int) -> None:
    for name, res in result["datasets"].items():
        for key in ("miou", "mf1"):
            writer.add_scalar(f"heldout/{name}/zero_shot_{key}", res["zero_shot"][key], step)
            if "adapted" in res:
                writer.add_scalar(f"heldout/{name}/adapted_{key}", res["adapted"][key]["mean"], step)


def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Meta-train as ``cfg`` says, writing checkpoints, tensorboard and metrics under ``run_dir``."""
    run_dir = Path(run_dir)
    validate(cfg)
    seed_everything(cfg.seed)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    device = resolve_device(cfg.trainer.device)
    precision = Precision(cfg.trainer.precision, device.type)
    meta = cfg.meta

    mix = build_mix(cfg.data)
    sampler = TaskSampler(mix.train, mix.weights, meta.shots, meta.query, seed=cfg.seed, query_from=meta.query_from)
    for name, ds in mix.heldout.items():
        if cfg.eval.shots and len(ds) <= cfg.eval.shots:
            raise ConfigError(f"held-out dataset {name!r} has {len(ds)} images, fewer than eval.shots+1; "
                              f"lower eval.shots")
    model = build_model(cfg.model, mix.num_classes).to(device)
    learner = make_learner(model, meta, precision, max_steps=cfg.trainer.max_steps, model_cfg=cfg.model)
    optimizer = learner.make_optimizer()
    scaler = precision.grad_scaler()
    resolved = OmegaConf.to_container(cfg, resolve=True)

    def checkpoint(step: int) -> None:
        save_checkpoint(run_dir / "checkpoints" / "last.pt", model=model.state_dict(),
                        optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                        sampler=sampler.state_dict(), step=step, config=resolved, classes=mix.classes,
                        meta_state=learner.meta_state_dict())

    log.info("%s-training %s on %s, held out %s; %d outer steps of %d tasks, K=%d, alpha=%g, beta=%g, "
             "%s order, precision %s, device %s", learner.name, cfg.model.arch + "-" + cfg.model.encoder,
             list(mix.train), list(mix.heldout), cfg.trainer.max_steps, meta.meta_batch, meta.inner_steps,
             meta.inner_lr, meta.outer_lr, "first" if learner.is_first_order(cfg.trainer.max_steps) else "second",
             precision.mode, device)
    writer = SummaryWriter(str(run_dir / "tb"))
    t0 = time.perf_counter()
    try:
        bar = tqdm(range(1, cfg.trainer.max_steps + 1), desc="meta-train", disable=None, dynamic_ncols=True)
        for step in bar:
            log_now = step % cfg.trainer.log_every == 0 or step == cfg.trainer.max_steps
            # one outer step of the algorithm (metaseg/meta/base.py): tasks, inner loops, theta update
            stats = learner.meta_step(sampler, optimizer, scaler, step, device=device, log=log_now)

            if log_now:
                elapsed = time.perf_counter() - t0
                for key, value in stats.items():
                    writer.add_scalar(f"train/{key}", value, step)
                writer.add_scalar("train/tasks_per_second", step * meta.meta_batch / elapsed, step)
                outer, before = stats.get("outer_loss", float("nan")), stats.get("query_loss_before", float("nan"))
                bar.set_postfix(outer=f"{outer:.3f}", before=f"{before:.3f}")
                log.info("step %d/%d  outer %.4f  query before %.4f  after %.4f  (%.1fs)", step,
                         cfg.trainer.max_steps, outer, before, stats.get("query_loss_after", float("nan")), elapsed)
            if step % cfg.trainer.ckpt_every == 0 and step != cfg.trainer.max_steps:
                checkpoint(step)
            if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0 and step != cfg.trainer.max_steps:
                _log_eval(writer, evaluate_heldout(learner, mix.heldout, mix.num_classes, cfg.eval, device,
                                                   cfg.seed, mix.classes), step)

        step = cfg.trainer.max_steps
        checkpoint(step)
        result = evaluate_heldout(learner, mix.heldout, mix.num_classes, cfg.eval, device, cfg.seed, mix.classes)
        _log_eval(writer, result, step)
    finally:
        writer.close()
    metrics = {"step": step, "seconds": time.perf_counter() - t0, **result}
    metrics["objective"] = result.get("mean", {}).get("adapted_miou", float("nan"))
    write_json(run_dir / "metrics.json", metrics)
    log.info("wrote %s", run_dir / "metrics.json")
    return metrics
