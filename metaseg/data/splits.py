"""The meta-validation split: images of each meta-training dataset reserved for validation tasks.

Checkpoint selection (``best.pt``), early stopping and the choice of adaptation settings
(``eval.tune``) must never look at the held-out datasets, or the held-out scores stop being
an estimate of anything. They look at *validation tasks* instead: few-shot episodes drawn
from images of the training datasets that training never samples.

Which images: a dataset whose ``splits.csv`` marks some images with one of
``data.val_splits`` (default ``[val]``) reserves exactly those; any other reserves a seeded
fraction ``data.val_fraction`` of its images, drawn by
``numpy.random.default_rng([data.seed, crc32(dataset name)]).permutation(n)`` (the first
``round(fraction * n)``, at least one), so the split depends on the data config alone, not on
the run's seed: every arm of a comparison validates on the same images.

The split is made on whole images before a ``binary_class`` mix cuts datasets into per-class
tasks, so an image is validation for every class or for none. Validation images are served
without augmentation (a resize, like the held-out datasets).
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from metaseg.data.view import IndexView, SegmentationDataset
from metaseg.utils.errors import ConfigError

if TYPE_CHECKING:
    from metaseg.data.mix import Normalized


class SplitPart(IndexView):
    """One side of a dataset's meta-validation split: its images ``indices``; ``plain=True`` (the
    validation side) serves them un-augmented."""

    def __init__(self, base: SegmentationDataset, indices: Sequence[int], *, plain: bool = False):
        super().__init__(base, indices)
        self.plain = plain

    def __getitem__(self, index: int):
        i = self.indices[index]
        return self.base.plain_sample(i) if self.plain else self.base[i]


def reserved_by_splits(ds: Normalized, val_splits: Sequence[str]) -> Optional[list[int]]:
    """Indices whose ``splits.csv`` split is one of ``val_splits``; None when the file marks none."""
    pairs = ds.base.pairs
    if not pairs or not val_splits:
        return None
    wanted = set(val_splits)
    idx = [i for i, p in enumerate(pairs) if p.split in wanted]
    return idx or None


def validation_indices(name: str, ds: Normalized, cfg: Any) -> tuple[list[int], list[int], str]:
    """``(train indices, validation indices, how)`` of one dataset of the mix (see the module docstring)."""
    n = len(ds)
    by_file = reserved_by_splits(ds, list(cfg.get("val_splits") or []))
    if by_file is not None:
        val = sorted(by_file)
        how = f"splits.csv {list(cfg.get('val_splits'))}"
    else:
        fraction = float(cfg.get("val_fraction") or 0.0)
        if fraction <= 0:
            return list(range(n)), [], "none"
        count = max(1, int(round(fraction * n)))
        if count >= n:
            raise ConfigError(f"data.val_fraction={fraction} reserves all {n} images of dataset {name!r} for "
                              f"validation; lower data.val_fraction")
        order = np.random.default_rng([int(cfg.get("seed") or 0), zlib.crc32(name.encode())]).permutation(n)
        val = sorted(int(i) for i in order[:count])
        how = f"seeded fraction {fraction}"
    held = set(val)
    train = [i for i in range(n) if i not in held]
    if not train:
        raise ConfigError(f"dataset {name!r}: every image is marked {list(cfg.get('val_splits'))} in splits.csv; "
                          f"leave some for training or set data.val_splits=[]")
    return train, val, how


def split_validation(name: str, ds: Normalized, cfg: Any) -> tuple[SegmentationDataset, Optional[SplitPart], str]:
    """``(training view, validation view or None, how)`` of dataset ``name``."""
    train, val, how = validation_indices(name, ds, cfg)
    if not val:
        return ds, None, how
    return SplitPart(ds, train), SplitPart(ds, val, plain=True), how


def check_validation_sizes(val: dict[str, SegmentationDataset], shots: Sequence[int]) -> None:
    """Every validation dataset must keep a query image after the largest support."""
    largest = max(shots, default=0)
    small = {n: len(d) for n, d in val.items() if len(d) <= largest}
    if small:
        raise ConfigError(f"validation datasets {small} have too few images for eval.shots={largest} plus a query "
                          f"image; raise data.val_fraction, lower eval.shots, or set data.val_fraction=0 and "
                          f"trainer.best_metric=mean.adapted_miou (selects on held-out scores)")
