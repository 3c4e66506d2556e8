"""What every algorithm's outer step shares: sample tasks, backpropagate each, step theta once.

``Algorithm.meta_step`` is the whole outer step, on one screen:

1. set beta for this step (constant or cosine), clear gradients, take the fp16 scale;
2. for each of ``meta_batch`` tasks: the algorithm's ``task_objective`` (MAML: the query
   loss after the inner loop), skipped if it is not finite (:mod:`metaseg.meta.safety`),
   else backpropagated through the ``GradScaler`` with weight 1/meta_batch;
3. if some tasks were skipped, the gradient is rescaled to the mean over the others;
4. unscale, clip to ``clip_grad`` (optional), one optimizer step, update the scale.

Under torchrun (:mod:`metaseg.engine.distributed`) each process runs step 2 on its slice of
the meta-batch (still weighted 1/meta_batch, the global size) and ``grad_sync``, set by the
trainer, sums the gradients and task counts over the processes at the start of step 3, so
steps 3-4 see the gradient a one-process run would and every process steps identically.

Algorithms change step 2 (Reptile backpropagates a surrogate whose gradient is
theta - phi) or the whole step (ERM makes K+1 plain updates). The optimizer and scaler
are created by the caller (``make_optimizer`` says which), so checkpoints keep owning them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import torch
from torch import nn

from metaseg.meta.capability import raise_if_second_order_failure
from metaseg.meta.mamlpp import outer_lr_at
from metaseg.meta.safety import NonFiniteGuard

log = logging.getLogger(__name__)
SCHEDULES = ("constant", "cosine")


@dataclass
class OuterSettings:
    """The outer loop's hyper-parameters: beta and its schedule, tasks per step, clipping."""

    lr: float = 1e-3  # beta (Reptile: epsilon)
    meta_batch: int = 1
    schedule: str = "constant"  # constant | cosine
    lr_min: float = 0.0  # cosine: beta reached at the last step
    max_steps: int = 1  # cosine: length of the schedule
    clip_grad: Optional[float] = None  # max L2 norm of the outer gradient
    max_bad_in_a_row: int = 3  # non-finite tasks in a row that stop the run

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"outer schedule must be one of {SCHEDULES}, got {self.schedule!r}")


@dataclass
class TaskOutcome:
    used: bool  # backpropagated (False: skipped as non-finite)
    stats: dict = field(default_factory=dict)


def tasks_of_step(sampler, n: int):
    """This process's tasks of a meta-batch of ``n``: ``sampler.sample_batch(n)`` (a sharded
    ``TaskSampler``), or ``n`` calls of ``sample()`` for any other sampler."""
    batch = getattr(sampler, "sample_batch", None)
    return batch(n) if batch is not None else (sampler.sample() for _ in range(n))


def _mean_stats(outcomes: list[TaskOutcome]) -> dict:
    keys = sorted({k for o in outcomes if o.used for k in o.stats})
    used = [o for o in outcomes if o.used]
    return {k: sum(o.stats[k] for o in used if k in o.stats) / max(sum(k in o.stats for o in used), 1)
            for k in keys}


class GradSync(Protocol):
    """Sums the outer gradients of every process (``metaseg.engine.distributed``)."""

    def reduce(self, params: list[nn.Parameter], n_used: int, n_tasks: int) -> tuple[int, int]:
        """Make ``p.grad`` the sum over processes; returns the global (used, drawn) task counts."""

    def mean_stats(self, outcomes: list[TaskOutcome]) -> dict:
        """Task statistics averaged over every process's tasks."""


class Algorithm:
    """Outer-loop machinery; subclasses define ``task_objective`` (and the inner loop)."""

    name = "base"
    grad_sync: Optional[GradSync] = None  # set by the trainer when several processes share a run
    model: nn.Module
    precision: Any
    outer: OuterSettings
    guard: NonFiniteGuard
    last_stats: dict

    # -- what the outer optimizer updates and what a checkpoint must keep ----------------
    def extra_parameters(self) -> list[nn.Parameter]:
        """Meta-learned tensors besides the model's weights (Meta-SGD's step sizes)."""
        return []

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad] + self.extra_parameters()

    def make_optimizer(self) -> torch.optim.Optimizer:
        """The outer optimizer: Adam at beta over theta and the algorithm's extra tensors."""
        return torch.optim.Adam(self.parameters(), lr=self.outer.lr)

    def meta_state_dict(self) -> dict:
        """Plain tensors to save beside the model (checkpoint key ``meta_state``)."""
        return {}

    def load_meta_state_dict(self, state: Optional[dict]) -> None:
        return None

    # torch's state_dict protocol, so checkpoints save and restore the learner like the optimizer
    def state_dict(self) -> dict:
        return self.meta_state_dict()

    def load_state_dict(self, state: Optional[dict]) -> None:
        self.load_meta_state_dict(state)

    # -- one outer step -------------------------------------------------------------------
    def task_objective(self, task) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def query_loss_before(self, task) -> float:
        raise NotImplementedError

    def meta_step(self, sampler, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, step: int,
                  *, device: Optional[torch.device] = None, log: bool = False) -> dict:
        """One outer step on ``meta_batch`` tasks from ``sampler``; returns mean task statistics."""
        self.step, self.logging = step, log
        lr = self.begin_step(optimizer, scaler, step)
        outcomes = []
        for task in tasks_of_step(sampler, self.outer.meta_batch):  # this process's share of the tasks
            outcomes.append(self.task_step(task.to(device) if device is not None else task, scaler,
                                           1.0 / self.outer.meta_batch))
        stats = self.finish_step(optimizer, scaler, outcomes)
        stats["outer_lr"] = lr
        return stats

    def begin_step(self, optimizer, scaler, step: int) -> float:
        lr = outer_lr_at(step, self.outer.lr, self.outer.schedule, self.outer.max_steps, self.outer.lr_min)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        if self.precision.mode == "16":
            self.precision.scale = float(scaler.get_scale())
        return lr

    def task_step(self, task, scaler, weight: float) -> TaskOutcome:
        """Backpropagate one task's objective with ``weight``, unless it is not finite."""
        before = self.query_loss_before(task) if self.logging else None
        self.precision.nonfinite = False
        objective = self.task_objective(task)
        stats = dict(self.last_stats)
        stats["outer_loss"] = float(objective.detach())
        overflow = self.precision.mode == "16" and self.precision.nonfinite
        if not overflow and not self.guard.finite(*stats.values()):
            self.guard.skip(self.step, "inner or query loss")
            return TaskOutcome(False, stats)
        if not overflow:
            self.guard.ok()
        with raise_if_second_order_failure():
            scaler.scale(objective * weight).backward()
        if before is not None:
            stats["query_loss_before"] = before
        return TaskOutcome(True, stats)

    def finish_step(self, optimizer, scaler, outcomes: list[TaskOutcome]) -> dict:
        """Average over the tasks used, unscale, clip, step theta; skip the step if nothing is usable."""
        n_used, n_tasks = sum(o.used for o in outcomes), len(outcomes)
        if self.grad_sync is not None:  # several processes: sum gradients and counts over them
            n_used, n_tasks = self.grad_sync.reduce(self.parameters(), n_used, n_tasks)
            stats = self.grad_sync.mean_stats(outcomes) if self.logging else _mean_stats(outcomes)
        else:
            stats = _mean_stats(outcomes)
        stats["tasks_skipped"] = float(n_tasks - n_used)
        params = [p for p in self.parameters() if p.grad is not None]
        if n_used == 0 or not params:
            optimizer.zero_grad(set_to_none=True)
            return stats
        if n_used < n_tasks:
            for p in params:
                p.grad.mul_(n_tasks / n_used)
        scaler.unscale_(optimizer)
        if self.outer.clip_grad:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.outer.clip_grad))
        else:
            norm = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
        stats["grad_norm"] = norm
        if self.precision.mode != "16" and not self.guard.finite(norm):
            optimizer.zero_grad(set_to_none=True)
            self.guard.skip(self.step, "outer gradient")
            stats["tasks_skipped"] = float(len(outcomes))
            return stats
        scaler.step(optimizer)
        scaler.update()
        if self.precision.mode == "16":
            stats["loss_scale"] = float(scaler.get_scale())
        return stats
