"""A dataset of image/mask file pairs: checked, decoded and cached when it is built.

Every on-disk format (folder, VOC, Cityscapes, FSS-1000) lists its pairs and its label map
and hands them to :class:`PairDataset`, which

1. reads every header (unreadable files, image/mask size mismatches, RGB masks where class
   indices are declared),
2. decodes every pair once (truncated files, mask values outside the declared mapping),
   maps masks into the mix's label space, resizes to the working resolution and keeps the
   result as uint8 (:mod:`metaseg.data.cache`),
3. serves ``(image float (3, size, size) in [0, 1], mask int64 (size, size))`` through a
   joint transform (:mod:`metaseg.data.transforms`), and ``full_resolution(i)`` at the
   original size for sliding-window evaluation.

All problems of a kind are gathered and reported at once, first few files named, before
any training starts.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from metaseg.data.cache import DiskCache, disk_cache
from metaseg.data.decode import Pair, decode_pair, probe
from metaseg.data.labels import LabelMap
from metaseg.data.transforms import JointTransform, patch_place, working_hw
from metaseg.data.view import SegmentationDataset
from metaseg.utils.errors import ConfigError, DataError
from metaseg.utils.masks import IGNORE

log = logging.getLogger(__name__)

# kind -> (what is wrong, how to fix it); reported in this order
PROBLEMS = {
    "unreadable": ("cannot be read (unreadable or truncated)", "replace or remove these files"),
    "size": ("have image and mask of different sizes", "each mask must have its image's width and height"),
    "rgb": ("are colour (RGB) masks, but class-index masks are declared",
            "save masks as single-channel PNGs of class indices (mode L or P), or for 0/255 masks set "
            "{key}.threshold=128"),
    "values": ("hold mask values outside the declared mapping {declared}",
               "fix the masks, or declare the values ({key}.mask_values, {key}.ignore_values, {key}.classes)"),
}


def few(items: Sequence[str], n: int = 3) -> str:
    """The first ``n`` items and how many more: ``a, b, c and 7 more``."""
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def _describe(values: list[int]) -> str:
    if len(values) > 12:
        return "{" + ", ".join(map(str, values[:12])) + ", ...}"
    return "{" + ", ".join(map(str, values)) + "}"


def raise_problems(name: str, problems: list[tuple[str, str]], labels: LabelMap, where: Path) -> None:
    """One ``DataError`` line for the first kind of problem found, naming the first few files."""
    if not problems:
        return
    key = f"data.datasets.{name}"
    for kind, (what, fix) in PROBLEMS.items():
        files = [detail for k, detail in problems if k == kind]
        if files:
            fmt = {"key": key, "declared": _describe(labels.declared_values())}
            raise DataError(f"dataset {name!r} ({where}): {len(files)} file(s) {what.format(**fmt)}: "
                            f"{few(files)}; {fix.format(**fmt)}")


def decode_workers(data_cfg: Any) -> int:
    n = data_cfg.get("workers")
    return max(1, int(n)) if n is not None else max(1, min(8, os.cpu_count() or 1))


def evenly_spaced(items: list, limit: Optional[int]) -> list:
    """``limit`` items spread evenly over ``items`` (all of them when ``limit`` is null or larger)."""
    if limit is None or limit >= len(items):
        return items
    if limit < 1:
        return []
    idx = np.linspace(0, len(items) - 1, limit).round().astype(int)
    return [items[i] for i in idx]


class PairDataset(SegmentationDataset):
    """Checked, decoded, cached image/mask pairs of one dataset (see the module docstring)."""

    def __init__(self, name: str, pairs: Sequence[Pair], labels: LabelMap, *, size: int, num_classes: int,
                 where: Path, augment: Optional[Any] = None, seed: int = 0,
                 disk: Optional[DiskCache] = None, workers: int = 1, patch_scale: Optional[float] = None,
                 fg_fraction: float = 0.0):
        self.name, self.pairs, self.labels, self.where = name, list(pairs), labels, where
        self.size, self.num_classes = size, num_classes
        self.augmented = augment is not None and bool(augment.enabled)
        self.patch_scale = patch_scale  # data.patches: cached at scale x original, served as patches
        self.fg_fraction = fg_fraction  # data.fg_patches: share of patches placed on foreground
        self.transform = JointTransform(size, augment if self.augmented else None, seed=seed, name=name,
                                        patch=patch_scale is not None, fg_fraction=fg_fraction)
        if not self.pairs:
            raise DataError(f"dataset {name!r} ({where}): no image/mask pairs left to use; check its folder, "
                            f"split and groups filters")
        with ThreadPoolExecutor(workers) as pool:
            probes = list(pool.map(lambda p: probe(p, labels), self.pairs))
            raise_problems(name, [p.problem for p in probes if p.problem], labels, where)
            self.sizes = [p.size for p in probes]  # original (W, H)
            hws = [working_hw(w, h, size, self.augmented, patch_scale) for w, h in self.sizes]
            results = list(pool.map(lambda a: self._load(*a, disk), zip(self.pairs, hws)))
        raise_problems(name, [problem for _, problem in results if problem], labels, where)
        self.images = [torch.from_numpy(np.ascontiguousarray(r[0].transpose(2, 0, 1))) for r, _ in results]
        self.masks = [torch.from_numpy(np.ascontiguousarray(r[1])) for r, _ in results]
        counts = [np.bincount(m.numpy().ravel(), minlength=256) for m in self.masks]
        # per image: labelled pixels of each mix class, then ignored pixels
        self._pixel_counts = np.stack([np.concatenate([c[:num_classes], [c[IGNORE]]]) for c in counts])
        log.info("dataset %r: %d pairs from %s", name, len(self.pairs), where)

    def _load(self, pair: Pair, hw: tuple[int, int], disk: Optional[DiskCache]):
        key = DiskCache.key(pair, hw, self.labels) if disk is not None else None
        if disk is not None:
            hit = disk.get(key)
            if hit is not None:
                return hit, None
        arrays, problem = decode_pair(pair, self.labels, hw)
        if arrays is not None and disk is not None:
            disk.put(key, *arrays)
        return arrays, problem

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[index], self.masks[index])

    @property
    def serves_patches(self) -> bool:
        return self.transform.patch

    @property
    def pixel_counts(self) -> np.ndarray:
        """Counted once, on the cached masks (augmented datasets: at their cache resolution)."""
        return self._pixel_counts

    def plain_sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached image and mask only resized (or, with ``data.patches``, centre-cropped), never augmented."""
        if not self.transform.random:
            return self[index]
        return JointTransform(self.transform.size, patch=self.transform.patch)(self.images[index], self.masks[index])

    def full_resolution(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image float (3, H, W) in [0, 1], mask int64 (H, W))`` at the file's original size.

        Decoded from disk on each call (not cached), with the same label mapping as the
        cached samples; for sliding-window evaluation at the original resolution. With
        ``data.patches``: the whole image at its working scale (the cached one; the original
        at ``scale: 1``), the scale the model saw its patches at.
        """
        if self.patch_scale is not None:
            return self.images[index].float().div(255), self.masks[index].long()
        arrays, problem = decode_pair(self.pairs[index], self.labels, None)
        if arrays is None:
            raise DataError(f"dataset {self.name!r}: {problem[1]} changed since it was checked")
        image = torch.from_numpy(np.ascontiguousarray(arrays[0].transpose(2, 0, 1))).float().div_(255)
        return image, torch.from_numpy(np.ascontiguousarray(arrays[1])).long()

    def support_patches(self, indices: Sequence[int], per_image: int, generator: torch.Generator
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """``per_image`` un-augmented ``size x size`` patches of each image ``indices``, at places
        drawn from ``generator`` (``data.fg_patches`` of them on foreground): the support batch
        of a few-shot episode when the model works on patches (``data.patches``)."""
        images, masks = [], []
        for i in indices:
            image, mask = self.images[int(i)], self.masks[int(i)]
            h, w = image.shape[-2:]
            for _ in range(per_image):
                top, left = patch_place(mask, self.size, generator, self.fg_fraction)
                images.append(image[:, top:top + self.size, left:left + self.size].float().div(255))
                masks.append(mask[top:top + self.size, left:left + self.size].long())
        return torch.stack(images), torch.stack(masks)

    def info(self, indices: Optional[Sequence[int]] = None) -> dict:
        """What ``metaseg-data`` reports: image count per split and original sizes (W, H)."""
        indices = range(len(self)) if indices is None else indices
        splits: dict[str, int] = {}
        for i in indices:
            split = self.pairs[i].split or "all"
            splits[split] = splits.get(split, 0) + 1
        w = [self.sizes[i][0] for i in indices] or [0]
        h = [self.sizes[i][1] for i in indices] or [0]
        return {"images": len(indices), "splits": splits, "root": str(self.where),
                "size_min": [min(w), min(h)], "size_max": [max(w), max(h)]}


def build_pair_dataset(name: str, pairs: Sequence[Pair], labels: LabelMap, data_cfg: Any, where: Path,
                       augment: bool, num_classes: int) -> PairDataset:
    """A :class:`PairDataset` with the mix's size, augmentation, cache and decoding threads."""
    return PairDataset(name, pairs, labels, size=int(data_cfg.size), num_classes=num_classes, where=where,
                       augment=data_cfg.augment if augment else None, seed=int(data_cfg.seed),
                       disk=disk_cache(data_cfg), workers=decode_workers(data_cfg),
                       patch_scale=patch_scale(name, data_cfg), fg_fraction=fg_fraction(data_cfg))


def patch_scale(name: str, data_cfg: Any) -> Optional[float]:
    """``data.datasets.NAME.scale`` when the mix works on patches (``data.patches``), else None."""
    if not data_cfg.get("patches"):
        return None
    scale = float(data_cfg.datasets[name].get("scale", 1.0))
    if not 0 < scale <= 4:
        raise ConfigError(f"data.datasets.{name}.scale={scale} must be in (0, 4] (1: the original resolution)")
    return scale


def fg_fraction(data_cfg: Any) -> float:
    """``data.fg_patches``: the share of patches placed to contain foreground (``data.patches`` only)."""
    value = float(data_cfg.get("fg_patches") or 0.0)
    if not 0 <= value <= 1:
        raise ConfigError(f"data.fg_patches={value} must be in [0, 1] (the share of patches placed on foreground)")
    if value and not data_cfg.get("patches"):
        raise ConfigError(f"data.fg_patches={value} places patches, but data.patches=false serves whole images: set "
                          f"data.patches=true, or data.fg_patches=0")
    return value
