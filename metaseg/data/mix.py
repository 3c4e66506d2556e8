"""A dataset mix: meta-training datasets with sampling weights, and held-out datasets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from metaseg.data.sources import build_source
from metaseg.utils.errors import ConfigError


class Normalized(Dataset):
    """Applies the mix's per-channel mean/std to a source's [0, 1] images."""

    def __init__(self, source: Dataset, mean, std):
        self.source = source
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        image, mask = self.source[index]
        return (image - self.mean) / self.std, mask


@dataclass
class Mix:
    classes: list[str]
    train: dict[str, Dataset]
    weights: list[float]
    heldout: dict[str, Dataset]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _check_names(cfg: Any) -> None:
    known = set(cfg.datasets)
    for key in ("train", "heldout"):
        unknown = [n for n in cfg[key] if n not in known]
        if unknown:
            raise ConfigError(
                f"data.{key} names {unknown}, which data.datasets does not define "
                f"(defined: {', '.join(sorted(known)) or 'none'})"
            )
    if not cfg.train:
        raise ConfigError("data.train is empty: name at least one dataset to meta-train on")
    both = sorted(set(cfg.train) & set(cfg.heldout))
    if both:
        raise ConfigError(
            f"{both} listed in both data.train and data.heldout: a held-out dataset must not be "
            f"meta-trained on; remove it from one of them"
        )


def build_mix(cfg: Any, *, need_train: bool = True) -> Mix:
    """Build the datasets a ``DataConfig`` names; ``need_train=False`` builds held-out ones only."""
    if need_train:
        _check_names(cfg)
    names = (list(cfg.train) if need_train else []) + list(cfg.heldout)
    built = {}
    for name in names:
        built[name] = Normalized(build_source(name, cfg.datasets[name], cfg), cfg.mean, cfg.std)
    for name, ds in built.items():
        if len(ds) == 0:
            raise ConfigError(f"dataset {name!r} has no images")
    train = {n: built[n] for n in (cfg.train if need_train else [])}
    weights = [float(cfg.datasets[n].weight) for n in train]
    if any(w < 0 for w in weights) or (train and sum(weights) <= 0):
        raise ConfigError(f"data.datasets.*.weight must be >= 0 with a positive sum, got {weights}")
    return Mix(list(cfg.classes), train, weights, {n: built[n] for n in cfg.heldout})
