"""Episodes: a task is a support batch and a query batch drawn from one dataset of the mix.

Support and query never share an image. The sampler owns a numpy ``Generator`` seeded by the
run's seed, so the task sequence is reproducible and its state is plain data for
checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from metaseg.utils.errors import ConfigError


def collate(dataset: Dataset, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    images, masks = zip(*(dataset[int(i)] for i in indices))
    return torch.stack(images), torch.stack(masks)


@dataclass
class Task:
    dataset: str
    support: tuple[torch.Tensor, torch.Tensor]
    query: tuple[torch.Tensor, torch.Tensor]

    def to(self, device) -> "Task":
        move = lambda b: (b[0].to(device, non_blocking=True), b[1].to(device, non_blocking=True))  # noqa: E731
        return Task(self.dataset, move(self.support), move(self.query))


class TaskSampler:
    """Draws tasks: a dataset by weight, then ``shots + query`` distinct images from it."""

    def __init__(self, datasets: dict[str, Dataset], weights: Sequence[float], shots: int, query: int, seed: int):
        if shots < 1 or query < 1:
            raise ConfigError(f"meta.shots and meta.query must be >= 1, got {shots} and {query}")
        small = {n: len(d) for n, d in datasets.items() if len(d) < shots + query}
        if small:
            raise ConfigError(
                f"datasets {small} have fewer images than meta.shots + meta.query = {shots + query}; "
                f"lower meta.shots or meta.query"
            )
        self.names = list(datasets)
        self.datasets = datasets
        w = np.asarray(weights, dtype=np.float64)
        self.probs = w / w.sum()
        self.shots, self.query = shots, query
        self.rng = np.random.default_rng(seed)

    def sample(self) -> Task:
        name = self.names[self.rng.choice(len(self.names), p=self.probs)]
        ds = self.datasets[name]
        idx = self.rng.choice(len(ds), self.shots + self.query, replace=False)
        return Task(name, collate(ds, idx[: self.shots]), collate(ds, idx[self.shots :]))

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
