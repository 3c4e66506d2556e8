"""What a user watches while a run trains: a progress bar and diagnostics.

Everything here only reads the model (and runs under ``state.rng_isolated`` in the trainer),
so turning it on or off never changes what is trained.

- ``progress``: a tqdm bar with ETA that switches itself off when stderr is not a terminal
  (logs and CI output stay clean); a resumed run's bar starts at the resumed step.
- ``outer_grad_norm``: the L2 norm of the meta-gradient the outer optimizer is given.
- ``InnerLoopMonitor``: a few fixed training tasks, drawn once from the seed; at each log step
  their query loss after k = 0..K inner steps, so one curve per k shows what adaptation buys
  as meta-training goes on.
Held-out prediction pictures come from the evaluation itself (``eval.pictures``), which
draws them from the images it scores.
"""

from __future__ import annotations

import sys
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from metaseg.data.tasks import Task, TaskSampler
from metaseg.meta.losses import pixel_cross_entropy

MONITOR_SEED_SALT = 0x6D6F6E  # "mon": the monitor tasks' generator is independent of training's


def progress(start: int, total: int, file=None) -> tqdm:
    """Steps ``start+1 .. total`` with a bar and ETA; disabled when ``file`` (stderr) is no terminal."""
    return tqdm(range(start + 1, total + 1), initial=start, total=total, desc="meta-train",
                disable=None, dynamic_ncols=True, file=file if file is not None else sys.stderr)


def outer_grad_norm(parameters: Iterable[torch.Tensor], scale: float = 1.0) -> float:
    """L2 norm over all gradients, divided by the loss ``scale`` they carry (fp16), nan if none."""
    grads = [p.grad.detach().float() for p in parameters if p.grad is not None]
    if not grads:
        return float("nan")
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) / scale


class InnerLoopMonitor:
    """Query loss of fixed tasks after 0..K inner steps, through the learner's public ``adapt``.

    Costs K(K+1)/2 inner steps per task at each log step; ``trainer.monitor_tasks=0`` turns it off.
    """

    def __init__(self, sampler: TaskSampler, num_tasks: int, seed: int, device: torch.device):
        probe = TaskSampler(sampler.datasets, sampler.probs, sampler.shots, sampler.query,
                            seed=[MONITOR_SEED_SALT, int(seed)])
        self.tasks: list[Task] = [probe.sample().to(device) for _ in range(num_tasks)]

    def query_losses(self, learner) -> list[float]:
        """Mean query loss over the tasks after k inner steps, for k = 0..K."""
        if not self.tasks:
            return []
        steps = int(learner.inner_steps)
        totals = [0.0] * (steps + 1)
        for task in self.tasks:
            for k in range(steps + 1):
                model = learner.model if k == 0 else learner.adapt(*task.support, steps=k)
                totals[k] += _loss(learner, model, *task.query) / len(self.tasks)
                if k:
                    del model
        return totals


@torch.no_grad()
def _loss(learner, model: nn.Module, images: torch.Tensor, masks: torch.Tensor) -> float:
    model.train()  # the same batch-statistics mode the outer loss sees
    with learner.precision.autocast():
        logits = model(images)
    return float(getattr(learner, "loss", pixel_cross_entropy)(logits.float(), masks))
