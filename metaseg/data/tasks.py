"""Episodes: a task is a support batch and a query batch drawn from one dataset of the mix.

Support and query never share an image. The sampler owns a numpy ``Generator`` seeded by the
run's seed, so the task sequence is reproducible and its state is plain data for
checkpoints.

Under torchrun every process holds the same sampler (same seed, same state) and calls
``sample_batch(meta_batch)``: each draws the whole global meta-batch's random choices (cheap:
a few integers per task), then loads and returns only its own slice (``shard``). The ranks'
shares are disjoint and their union is exactly the meta-batch a one-process run draws, and the
sampler's state does not depend on the number of processes, so a checkpoint resumes under
any world size (the slices simply re-shard).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Optional, Sequence

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
        self.rank, self.world_size = 0, 1

    def shard(self, rank: int, world_size: int) -> "TaskSampler":
        """Make ``sample_batch`` return only process ``rank``'s slice of each meta-batch."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.rank, self.world_size = int(rank), int(world_size)
        return self

    def share(self, n: int) -> range:
        """Positions of this process's tasks in a meta-batch of ``n``: contiguous, sizes differing by <= 1."""
        lo = self.rank * n // self.world_size
        return range(lo, (self.rank + 1) * n // self.world_size)

    def sample(self) -> Task:
        return self._load(self._draw())

    def sample_batch(self, n: int) -> Iterator[Task]:
        """This process's tasks of the next meta-batch of ``n``, loaded lazily one at a time.

        The random choices of all ``n`` tasks are drawn now, so the stream advances the same
        on every process; only this process's slice is loaded. One process: the ``n`` tasks
        ``sample()`` would give.
        """
        draws = [self._draw() for _ in range(n)]
        return (self._load(draws[i]) for i in self.share(n))

    def _draw(self) -> tuple:
        i = self.rng.choice(len(self.names), p=self.probs)
        if self.query_from == "other":
            return self._cross_dataset(i)
        idx = self.rng.choice(len(self.datasets[self.names[i]]), self.shots + self.query, replace=False)
        return self.names[i], idx[: self.shots], self.names[i], idx[self.shots :]

    def _load(self, draw: tuple) -> Task:
        s_name, s_idx, q_name, q_idx = draw
        return Task(s_name, collate(self.datasets[s_name], s_idx), collate(self.datasets[q_name], q_idx),
                    query_dataset=q_name if q_name != s_name else None)

    def _cross_dataset(self, i: int) -> tuple:
        others = self.probs.copy()
        if others.sum() - others[i] <= 0:  # every other dataset has weight 0: uniform over them
            others = np.ones_like(others)
        others[i] = 0.0
        j = self.rng.choice(len(self.names), p=others / others.sum())
        ds_i, ds_j = self.datasets[self.names[i]], self.datasets[self.names[j]]
        s_idx = self.rng.choice(len(ds_i), self.shots, replace=False)
        q_idx = self.rng.choice(len(ds_j), self.query, replace=False)
        return self.names[i], s_idx, self.names[j], q_idx

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
