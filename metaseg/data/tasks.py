"""Episodes: a task is a support batch and a query batch drawn from one dataset of the mix.

Support and query never share an image. The sampler owns a numpy ``Generator`` seeded by the
run's seed, so the task sequence is reproducible and its state is plain data for
checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

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
    query_dataset: Optional[str] = None  # the query's dataset when it is not ``dataset`` (query_from=other)

    def to(self, device) -> "Task":
        move = lambda b: (b[0].to(device, non_blocking=True), b[1].to(device, non_blocking=True))  # noqa: E731
        return replace(self, support=move(self.support), query=move(self.query))


class TaskSampler:
    """Draws tasks: a dataset by weight, then ``shots + query`` distinct images from it.

    ``query_from="other"`` draws the query batch from another dataset of the mix instead
    (by the same weights, renormalised without the support's dataset): the cross-dataset
    D_i -> D_j task of MLDG. Support and query then cannot share an image either.
    """

    QUERY_FROM = ("same", "other")

    def __init__(self, datasets: dict[str, Dataset], weights: Sequence[float], shots: int, query: int, seed: int,
                 query_from: str = "same"):
        if shots < 1 or query < 1:
            raise ConfigError(f"meta.shots and meta.query must be >= 1, got {shots} and {query}")
        if query_from not in self.QUERY_FROM:
            raise ConfigError(f"meta.query_from={query_from!r} is not one of {', '.join(self.QUERY_FROM)}")
        if query_from == "other" and len(datasets) < 2:
            raise ConfigError(f"meta.query_from=other needs at least two meta-training datasets, data.train has "
                              f"{list(datasets)}; add one or use meta.query_from=same")
        need = shots + query if query_from == "same" else max(shots, query)
        small = {n: len(d) for n, d in datasets.items() if len(d) < need}
        if small:
            raise ConfigError(
                f"datasets {small} have fewer images than "
                f"{'meta.shots + meta.query' if query_from == 'same' else 'max(meta.shots, meta.query)'} = {need}; "
                f"lower meta.shots or meta.query"
            )
        self.query_from = query_from
        self.names = list(datasets)
        self.datasets = datasets
        w = np.asarray(weights, dtype=np.float64)
        self.probs = w / w.sum()
        self.shots, self.query = shots, query
        self.rng = np.random.default_rng(seed)

    def sample(self) -> Task:
        i = self.rng.choice(len(self.names), p=self.probs)
        if self.query_from == "other":
            return self._cross_dataset(i)
        name = self.names[i]
        ds = self.datasets[name]
        idx = self.rng.choice(len(ds), self.shots + self.query, replace=False)
        return Task(name, collate(ds, idx[: self.shots]), collate(ds, idx[self.shots :]))

    def _cross_dataset(self, i: int) -> Task:
        others = self.probs.copy()
        if others.sum() - others[i] <= 0:  # every other dataset has weight 0: uniform over them
            others = np.ones_like(others)
        others[i] = 0.0
        j = self.rng.choice(len(self.names), p=others / others.sum())
        ds_i, ds_j = self.datasets[self.names[i]], self.datasets[self.names[j]]
        s_idx = self.rng.choice(len(ds_i), self.shots, replace=False)
        q_idx = self.rng.choice(len(ds_j), self.query, replace=False)
        return Task(self.names[i], collate(ds_i, s_idx), collate(ds_j, q_idx), query_dataset=self.names[j])

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
