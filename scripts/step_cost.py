"""Seconds per outer step of several training configs, measured side by side in one process.

An equal-wall-time comparison needs each arm's cost per outer step. Timing whole runs one after
another measures the machine's load as much as the algorithm: on a 2-core machine a run beside
another job can take twice as long. Here every config takes one outer step in turn, round after
round, so load drifts hit all of them alike, and the median per config is kept
(``scripts/algo_cost.py`` and ``scripts/fair_compare.py``'s ``@time`` arms use it; a script
imports it as ``from step_cost import ...``, its own folder being first on ``sys.path``).

Each config is set up by ``metaseg-train``'s own ``build_run`` (``metaseg/engine/training/setup.py``:
the mix with its validation split, the task sampler, the model and its learner, seeded), but
nothing is written.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Mapping

import torch
from omegaconf import DictConfig
from torch import nn

from metaseg.data.tasks import TaskSampler
from metaseg.engine.distributed import Context
from metaseg.engine.training.setup import build_run


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


def prepare(cfg: DictConfig, device: torch.device = torch.device("cpu")) -> StepRunner:
    """A :class:`StepRunner` for a composed ``train`` config, on ``device``."""
    run = build_run(cfg, Context(device=device))
    return StepRunner(run.model, run.learner, run.sampler, run.optimizer, run.scaler, device)


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
