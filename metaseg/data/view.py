"""What every dataset of a mix answers, and the one way to wrap a dataset: a view that delegates.

A mix dataset is a leaf (a :class:`~metaseg.data.pairs.PairDataset` of files, a generated
domain) under a few views: normalisation (``Normalized``), augmentation of the generated source
(``Augmented``), a selection of its images (:class:`IndexView`: FSS-1000 class parts, the two
sides of the meta-validation split, binary per-class datasets). Evaluation and ``metaseg-data``
ask the top of that stack questions the answer to which lies further down: does it serve
patches, its support patches, its sample at full resolution, its normalisation, its pixel counts.
:class:`SegmentationDataset` gives a leaf's answers, :class:`DatasetView` passes every question
to the dataset it wraps, so a view overrides only what it changes and a caller asks the top
dataset plainly instead of digging through the layers.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from metaseg.utils.masks import IGNORE

Sample = tuple[torch.Tensor, torch.Tensor]


def count_pixels(dataset: Dataset, num_classes: int) -> np.ndarray:
    """Per image of ``dataset``: labelled pixels of each class, then ignored pixels, counted on its samples."""
    rows = []
    for i in range(len(dataset)):
        mask = dataset[i][1].numpy().ravel()
        rows.append(np.bincount(np.where(mask == IGNORE, 0, mask + 1), minlength=num_classes + 1))
    out = np.stack(rows)
    return np.concatenate([out[:, 1:], out[:, :1]], axis=1)


class SegmentationDataset(Dataset):
    """A dataset of ``(image (C, H, W), mask (H, W))`` samples with a leaf's answers to the mix's questions.

    ``pairs``: the image/mask files it was listed from (none for a generated or wrapped dataset).
    """

    pairs: Sequence = ()
    num_classes: int  # a leaf that keeps no pixel counts counts its samples over these classes

    @property
    def serves_patches(self) -> bool:
        """Whether samples are ``data.size`` patches of larger images (``data.patches``), scored by sliding window."""
        return False

    @property
    def normalisation(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Per-channel ``(mean, std)``, each (C, 1, 1), the images were normalised with; None: not normalised."""
        return None

    @property
    def pixel_counts(self) -> np.ndarray:
        """Per image: labelled pixels of each class, then ignored pixels, at the working resolution.

        A dataset that keeps no counts is counted from its samples, which are deterministic
        when they are not augmented.
        """
        return count_pixels(self, self.num_classes)

    def full_resolution(self, index: int) -> Sample:
        """The sample at the file's original size, never augmented; a leaf rendered at ``data.size`` gives its
        ordinary sample."""
        return self[index]

    def plain_sample(self, index: int) -> Sample:
        """Sample ``index`` without augmentation (the validation side of the meta-validation split)."""
        return self[index]

    def support_patches(self, indices: Sequence[int], per_image: int, generator: torch.Generator) -> Sample:
        """``per_image`` patches of each image ``indices`` (``data.patches``); only a dataset that serves
        patches has them."""
        raise TypeError(f"{type(self).__name__} serves whole images, not patches: it has no support patches")

    def info(self, indices: Optional[Sequence[int]] = None) -> dict:
        """What ``metaseg-data`` reports of the images ``indices`` (all when None)."""
        return {"images": len(self) if indices is None else len(indices)}


class DatasetView(SegmentationDataset):
    """A dataset over ``base``: every question passes to ``base`` unless the view overrides it.

    ``plain_sample`` is the exception: only the views that know how their samples are drawn
    (``Normalized``, ``Augmented``) pass it down; any other serves its own sample, so an index
    view over an augmented dataset (FSS-1000's class parts) serves augmented ones.
    """

    def __init__(self, base: SegmentationDataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Sample:
        return self.base[index]

    @property
    def serves_patches(self) -> bool:
        return self.base.serves_patches

    @property
    def normalisation(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        return self.base.normalisation

    @property
    def pixel_counts(self) -> np.ndarray:
        return self.base.pixel_counts

    def full_resolution(self, index: int) -> Sample:
        return self.base.full_resolution(index)

    def support_patches(self, indices: Sequence[int], per_image: int, generator: torch.Generator) -> Sample:
        return self.base.support_patches(indices, per_image, generator)

    def info(self, indices: Optional[Sequence[int]] = None) -> dict:
        return self.base.info(indices)


class IndexView(DatasetView):
    """The images ``indices`` of ``base``: every question asked of its own numbering."""

    def __init__(self, base: SegmentationDataset, indices: Sequence[int]):
        super().__init__(base)
        self.indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Sample:
        return self.base[self.indices[index]]

    @property
    def pixel_counts(self) -> np.ndarray:
        return np.asarray(self.base.pixel_counts)[self.indices]

    def full_resolution(self, index: int) -> Sample:
        return self.base.full_resolution(self.indices[index])

    def support_patches(self, indices: Sequence[int], per_image: int, generator: torch.Generator) -> Sample:
        return self.base.support_patches([self.indices[int(i)] for i in indices], per_image, generator)

    def info(self, indices: Optional[Sequence[int]] = None) -> dict:
        return self.base.info(self.indices if indices is None else [self.indices[int(i)] for i in indices])
