"""What a user watches while a run trains: a progress bar, diagnostics, prediction pictures.

Everything here only reads the model (and runs under ``state.rng_isolated`` in the trainer),
so turning it on or off never changes what is trained.

- ``progress``: a tqdm bar with ETA that switches itself off when stderr is not a terminal
  (logs and CI output stay clean); a resumed run's bar starts at the resumed step.
- ``outer_grad_norm``: the L2 norm of the meta-gradient the outer optimizer is given.
- ``InnerLoopMonitor``: a few fixed training tasks, drawn once from the seed; at each log step
  their query loss after k = 0..K inner steps, so one curve per k shows what adaptation buys
  as meta-training goes on.
- ``prediction_grid``: image | ground truth | zero-shot | adapted prediction rows for a
  held-out dataset, as one RGB image for tensorboard.
"""

from __future__ import annotations

import sys
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from metaseg.data.tasks import Task, TaskSampler, collate
from metaseg.engine.evaluate import episode_rng
from metaseg.meta.maml import IGNORE_INDEX, pixel_cross_entropy

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


# -- pictures -------------------------------------------------------------------------
def palette(num_classes: int) -> np.ndarray:
    """The VOC colour map (bit-interleaved), class 0 black; index 255 (ignored) white."""
    colours = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours[i] = (r, g, b)
    colours[IGNORE_INDEX] = (255, 255, 255)
    return colours


def _to_rgb(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) normalised images -> (N, H, W, 3) uint8, each image stretched to [0, 255]."""
    x = images.detach().float().cpu()
    x = x[:, :3] if x.shape[1] >= 3 else x[:, :1].expand(-1, 3, -1, -1)
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    high = x.amax(dim=(1, 2, 3), keepdim=True)
    x = (x - low) / (high - low).clamp_min(1e-8)
    return (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


@torch.inference_mode()
def _predict(model: nn.Module, images: torch.Tensor, precision) -> torch.Tensor:
    model.eval()
    with precision.autocast():
        return model(images).argmax(1)


def prediction_grid(learner, dataset: Dataset, indices: Sequence[int], num_classes: int,
                    device: torch.device, adapted: Optional[nn.Module] = None) -> np.ndarray:
    """One (H', W', 3) uint8 picture: a row per image of image | truth | zero-shot | adapted."""
    images, masks = collate(dataset, indices)
    images = images.to(device)
    colours = palette(num_classes)
    columns = [_to_rgb(images), colours[masks.numpy()],
               colours[_predict(learner.model, images, learner.precision).cpu().numpy()]]
    if adapted is not None:
        columns.append(colours[_predict(adapted, images, learner.precision).cpu().numpy()])
    n, h, w, _ = columns[0].shape
    gap = 2
    grid = np.full((n * h + (n - 1) * gap, len(columns) * w + (len(columns) - 1) * gap, 3), 128, np.uint8)
    for row in range(n):
        for col, pics in enumerate(columns):
            y, x = row * (h + gap), col * (w + gap)
            grid[y : y + h, x : x + w] = pics[row]
    return grid


def heldout_pictures(learner, datasets: dict[str, Dataset], num_classes: int, eval_cfg, device: torch.device,
                     seed: int, count: int) -> dict[str, np.ndarray]:
    """A ``prediction_grid`` per held-out dataset: ``count`` images outside evaluation episode 0's
    support set, the adapted column from adapting on that support set (as the evaluation does)."""
    shots = eval_cfg.shots if isinstance(eval_cfg.shots, int) else max(eval_cfg.shots or [0])
    out = {}
    for name, ds in datasets.items():
        order = episode_rng(seed, name, 0).permutation(len(ds))
        support, shown = order[:shots], sorted(order[shots:].tolist())[:count]
        if not shown:
            continue
        adapted = None
        if shots > 0 and eval_cfg.episodes > 0:
            images, masks = collate(ds, support)
            adapted = learner.adapt(images.to(device), masks.to(device), steps=eval_cfg.adapt_steps,
                                    lr=eval_cfg.adapt_lr)
        out[name] = prediction_grid(learner, ds, shown, num_classes, device, adapted)
    return out
