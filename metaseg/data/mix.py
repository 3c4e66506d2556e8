"""A dataset mix: meta-training datasets with sampling weights, and held-out datasets.

A mix config names its datasets (``data.datasets``), the ones to meta-train on
(``data.train``; null: every dataset not held out) and the held-out ones (``data.heldout``),
in one label space (``data.classes``) that each dataset maps into (:mod:`metaseg.data.labels`).
A source may return several datasets (FSS-1000: one per class) and ``data.task:
binary_class`` splits every dataset into one binary dataset per class
(:mod:`metaseg.data.binary`); the parts are named ``<dataset>/<part>`` and share their
dataset's sampling weight equally.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from metaseg.config import DEFAULT_MEAN, DEFAULT_STD
from metaseg.data.binary import BINARY_CLASSES, check_task, split_by_class, task_classes
from metaseg.data.labels import mix_classes
from metaseg.data.pairs import fg_fraction
from metaseg.data.sources import ON_DISK, build_source
from metaseg.data.splits import split_validation
from metaseg.data.view import DatasetView, SegmentationDataset
from metaseg.utils.errors import ConfigError


class Normalized(DatasetView):
    """Applies the mix's per-channel mean/std to a source's [0, 1] images."""

    def __init__(self, base: SegmentationDataset, mean, std):
        super().__init__(base)
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)

    def _normalise(self, sample):
        image, mask = sample
        return (image - self.mean) / self.std, mask

    def __getitem__(self, index: int):
        return self._normalise(self.base[index])

    @property
    def normalisation(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean, self.std

    def full_resolution(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image float (3, H, W) normalised, mask int64 (H, W))`` at the ORIGINAL size.

        The file's own width and height and the same label mapping (mix ids, 255 = ignore) as
        ``self[index]``, never augmented; for evaluation at the original resolution (sliding
        window). Sources that render at ``data.size`` (the generated one) return their normal
        sample.
        """
        return self._normalise(self.base.full_resolution(index))

    def plain_sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._normalise(self.base.plain_sample(index))

    def support_patches(self, indices, per_image: int, generator: torch.Generator):
        """Normalised support patches (``data.patches``; :meth:`PairDataset.support_patches`)."""
        return self._normalise(self.base.support_patches(indices, per_image, generator))


@dataclass
class Mix:
    classes: list[str]
    train: dict[str, SegmentationDataset]
    weights: list[float]
    heldout: dict[str, SegmentationDataset]
    parents: dict[str, str] = field(default_factory=dict)  # part name -> its entry of data.datasets
    task: str = "semantic"
    val: dict[str, SegmentationDataset] = field(default_factory=dict)  # validation parts (build_mix(validation=True))
    val_how: dict[str, str] = field(default_factory=dict)  # dataset -> how its validation images were chosen

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def train_names(cfg: Any) -> list[str]:
    """``data.train``, or every dataset not held out when it is null."""
    if cfg.get("train") is None:
        return [n for n in cfg.datasets if n not in set(cfg.heldout)]
    return list(cfg.train)


def _check_names(cfg: Any, train: list[str], need_train: bool) -> None:
    known = set(cfg.datasets)
    for key, names in (("train", train), ("heldout", list(cfg.heldout))):
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(
                f"data.{key} names {unknown}, which data.datasets does not define "
                f"(defined: {', '.join(sorted(known)) or 'none'})"
            )
    if not need_train:
        return
    if not train:
        raise ConfigError("data.train is empty: name at least one dataset to meta-train on")
    both = sorted(set(train) & set(cfg.heldout))
    if both:
        raise ConfigError(
            f"{both} listed in both data.train and data.heldout: a held-out dataset must not be "
            f"meta-trained on; remove it from one of them"
        )


def normalisation(cfg: Any) -> tuple[list[float], list[float]]:
    """``data.mean``/``std``; null (nothing filled them from encoder weights): 0.5/0.25 per RGB channel."""
    mean, std = cfg.get("mean"), cfg.get("std")
    return ([DEFAULT_MEAN] * 3 if mean is None else list(mean)), ([DEFAULT_STD] * 3 if std is None else list(std))


def build_mix(cfg: Any, *, need_train: bool = True, validation: bool = False) -> Mix:
    """Build the datasets a ``DataConfig`` names; ``need_train=False`` builds held-out ones only.

    ``validation=True`` reserves each training dataset's validation images
    (:mod:`metaseg.data.splits`): ``Mix.train`` keeps the rest, ``Mix.val`` holds them.

    On-disk datasets are listed, checked, decoded and cached here, so bad data stops the run
    before its first step.
    """
    if cfg.get("patches") and any(cfg.datasets[n].source not in ON_DISK for n in cfg.datasets):
        raise ConfigError("data.patches=true cuts patches from images on disk; the generated source renders at "
                          "data.size already: set data.patches=false")
    fg_fraction(cfg)  # a bad data.fg_patches stops the run before anything is decoded
    if cfg.size < 8:
        raise ConfigError(f"data.size={cfg.size} must be >= 8 (data=folder leaves it 0 for metaseg-eval to take "
                          f"the checkpoint's); set data.size=N")
    classes = mix_classes(cfg)
    task = check_task(cfg)
    train = train_names(cfg)
    _check_names(cfg, train, need_train)
    targets = task_classes(cfg, classes) if task == "binary_class" else []
    names = (train if need_train else []) + list(cfg.heldout)
    built: dict[str, dict[str, SegmentationDataset]] = {}
    val_sets: dict[str, SegmentationDataset] = {}
    val_how: dict[str, str] = {}
    mean, std = normalisation(cfg)
    for name in names:
        ds_cfg = cfg.datasets[name]
        source = build_source(name, ds_cfg, cfg, classes=classes, augment=need_train and name in train)
        parts = {f"{name}/{k}": v for k, v in source.items()} if isinstance(source, dict) else {name: source}
        out: dict[str, SegmentationDataset] = {}
        for part, ds in parts.items():
            if len(ds) == 0:
                raise ConfigError(f"dataset {part!r} has no images")
            ds = Normalized(ds, mean, std)
            if validation and need_train and name in train:  # whole images, before any per-class split
                ds, val_ds, val_how[part] = split_validation(part, ds, cfg)
                if val_ds is not None:
                    val_sets.update(split_by_class(part, val_ds, targets, classes) if task == "binary_class"
                                    else {part: val_ds})
            out.update(split_by_class(part, ds, targets, classes) if task == "binary_class" else {part: ds})
        built[name] = out
    train_sets, weights, parents = {}, [], {}
    for name in (train if need_train else []):
        w = float(cfg.datasets[name].weight)
        for part, ds in built[name].items():
            train_sets[part] = ds
            weights.append(w / len(built[name]))
            parents[part] = name
    if any(w < 0 for w in weights) or (train_sets and sum(weights) <= 0):
        raise ConfigError(f"data.datasets.*.weight must be >= 0 with a positive sum, got "
                          f"{[float(cfg.datasets[n].weight) for n in train]}")
    heldout = {}
    for name in cfg.heldout:
        for part, ds in built[name].items():
            heldout[part] = ds
            parents[part] = name
    out_classes = list(BINARY_CLASSES) if task == "binary_class" else classes
    return Mix(out_classes, train_sets, weights, heldout, parents, task, val_sets, val_how)
