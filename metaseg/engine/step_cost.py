"""Seconds per outer step of several training configs, measured side by side in one process.

An equal-wall-time comparison needs each arm's cost per outer step. Timing whole runs one after
another measures the machine's load as much as the algorithm: on a 2-core machine a run beside
another job can take twice as long. Here every config takes one outer step in turn, round after
round, so load drifts hit all of them alike, and the median per config is kept (the benchmarks
under ``scripts/`` and ``scripts/fair_compare.py``'s ``@time`` arms use it).

Each config is prepared as ``metaseg-train`` prepares it (the mix with its validation split, the
task sampler, the model and its learner, seeded), but nothing is written.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from omegaconf import DictConfig
from torch import nn

from metaseg.data.mix import build_mix
from metaseg.data.tasks import TaskSampler
from metaseg.engine.build import make_learner
from metaseg.meta.precision import Precision
from metaseg.models.factory import build_model


@dataclass
class StepRunner:
    """One config's learner, optimizer and task stream, ready for :meth:`step`."""

    model: nn.Module
    learner: object
    sampler: TaskSampler
    optimizer: torch.optim.Optimizer
    scaler: object
    device: torch.device
    steps: int = 0

    def step(self) -> float:
        """One outer step (a new task each time); its wall seconds."""
        self.steps += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        self.learner.meta_step(self.sampler, self.optimizer, self.scaler, self.steps, device=self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t


def prepare(cfg: DictConfig, device: torch.device = torch.device("cpu"), precision: Optional[str] = None) -> StepRunner:
    """A :class:`StepRunner` for a composed ``train`` config (``precision`` overrides ``trainer.precision``)."""
    torch.manual_seed(cfg.seed)
    mix = build_mix(cfg.data, validation=True)
    sampler = TaskSampler(mix.train, mix.weights, cfg.meta.shots, cfg.meta.query, seed=cfg.seed,
                          query_from=cfg.meta.query_from)
    model = build_model(cfg.model, mix.num_classes).to(device)
    prec = Precision(precision or cfg.trainer.precision, device.type)
    learner = make_learner(model, cfg.meta, prec, max_steps=10**6, model_cfg=cfg.model)
    return StepRunner(model, learner, sampler, learner.make_optimizer(), prec.grad_scaler(), device)


def interleaved_seconds(runners: Mapping[str, StepRunner], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """``warmup`` untimed steps of each runner, then ``rounds`` rounds of one timed step each, in turn."""
    for r in runners.values():
        for _ in range(warmup):
            r.step()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, r in runners.items():
            times[name].append(r.step())
    return times


def median_seconds(runners: Mapping[str, StepRunner], rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per outer step of each runner, measured side by side (:func:`interleaved_seconds`)."""
    return {name: statistics.median(t) for name, t in interleaved_seconds(runners, rounds, warmup).items()}
