"""``data.task: binary_class``: one class against the rest per task, the few-shot segmentation setting.

Every dataset of the mix is split into one binary dataset per class of ``data.binary_classes``
(null: every class but ``background``), named ``<dataset>/<class>``, holding the images where
that class has at least one labelled pixel at the working resolution. Masks become 1 on the
class, 0 elsewhere, and ignore (255) stays ignore; the mix's label space becomes
``[background, foreground]``. A task then draws its support and query images from one such
dataset: "segment this class from these few examples". Held-out datasets are split the same
way, so every held-out class is evaluated as its own binary dataset (the PASCAL-5i / FSS-1000
protocol), and a checkpoint trained this way evaluates any binary folder with its own head.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch

from metaseg.data.tasks import collate
from metaseg.data.view import IndexView, SegmentationDataset
from metaseg.utils.errors import ConfigError
from metaseg.utils.masks import IGNORE

log = logging.getLogger(__name__)
TASKS = ("semantic", "binary_class")
BINARY_CLASSES = ["background", "foreground"]


def binarize(mask: torch.Tensor, class_id: int) -> torch.Tensor:
    out = (mask == class_id).long()
    out[mask == IGNORE] = IGNORE
    return out


class BinaryClassView(IndexView):
    """Images ``indices`` of ``base`` with masks ``class_id`` -> 1, other classes -> 0, 255 kept."""

    def __init__(self, base: SegmentationDataset, class_id: int, indices: Sequence[int]):
        super().__init__(base, indices)
        self.class_id = int(class_id)

    def __getitem__(self, index: int):
        image, mask = super().__getitem__(index)
        return image, binarize(mask, self.class_id)

    def full_resolution(self, index: int):
        """The base dataset's original-size sample, its mask binarised the same way."""
        image, mask = super().full_resolution(index)
        return image, binarize(mask, self.class_id)

    def support_patches(self, indices: Sequence[int], per_image: int, generator: torch.Generator):
        """The support images themselves (with ``data.patches``: their centre patches), not random patches:
        binary tasks have always adapted on these, and cutting patches here would change their scores."""
        return collate(self, indices)

    @property
    def pixel_counts(self) -> np.ndarray:
        counts = super().pixel_counts
        fg = counts[:, self.class_id]
        return np.stack([counts[:, :-1].sum(1) - fg, fg, counts[:, -1]], axis=1)


def task_classes(data_cfg: Any, classes: Sequence[str]) -> list[int]:
    wanted = data_cfg.get("binary_classes")
    if wanted is None:
        return [i for i, c in enumerate(classes) if c != "background"]
    unknown = [c for c in wanted if c not in classes]
    if unknown:
        raise ConfigError(f"data.binary_classes names {unknown}, not in data.classes {list(classes)}")
    return [classes.index(c) for c in wanted]


def split_by_class(name: str, dataset: SegmentationDataset, class_ids: Sequence[int], classes: Sequence[str],
                   min_pixels: int = 1) -> dict[str, BinaryClassView]:
    """``{"<name>/<class>": BinaryClassView}`` for each class present in at least one image."""
    counts = np.asarray(dataset.pixel_counts)
    out: dict[str, BinaryClassView] = {}
    for cid in class_ids:
        idx = np.flatnonzero(counts[:, cid] >= min_pixels)
        if len(idx):
            out[f"{name}/{classes[cid]}"] = BinaryClassView(dataset, cid, idx)
        else:
            log.info("dataset %r: class %r appears in no image, no task for it", name, classes[cid])
    if not out:
        raise ConfigError(f"data.task=binary_class: dataset {name!r} has none of the classes "
                          f"{[classes[c] for c in class_ids]}; check data.binary_classes")
    return out


def check_task(data_cfg: Any) -> str:
    task = data_cfg.get("task") or "semantic"
    if task not in TASKS:
        raise ConfigError(f"data.task={task!r} is not one of {', '.join(TASKS)}")
    return task
