"""Dataset sources: how one entry of a mix's ``datasets`` becomes a dataset.

A source is a function ``(name, dataset_cfg, data_cfg, *, root, classes, augment)`` returning
a :class:`~metaseg.data.view.SegmentationDataset` (or ``{part: dataset}``, one per task, as
FSS-1000's class folders) yielding ``(image float (3, H, W) in [0, 1], mask int64 (H, W))``
pairs in the mix's label space ``classes``, at ``data.size``; training datasets (``augment``)
are randomly cropped and flipped. Every dataset also answers what evaluation asks
(:mod:`metaseg.data.view`), ``full_resolution(i)`` among them: the same sample at its original
size. A new on-disk format is one module here and one YAML in ``conf/data/``.

On-disk sources find their files at ``data.root / data.datasets.NAME.root`` (the dataset's
name when null), so one YAML works wherever the data lives: ``data.root=DIR``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

from metaseg.data.cityscapes import cityscapes_source
from metaseg.data.folder import folder_source
from metaseg.data.fss import fss_source
from metaseg.data.labels import mix_classes
from metaseg.data.synthetic import CLASSES, SyntheticDomain
from metaseg.data.transforms import JointTransform
from metaseg.data.view import DatasetView, SegmentationDataset
from metaseg.data.voc import voc_source
from metaseg.utils.errors import ConfigError

SourceFn = Callable[..., Any]


class Augmented(DatasetView):
    """Joint augmentation of a source that renders at ``data.size`` (the generated one); its full-resolution
    sample and pixel counts are the source's, un-augmented (no draw from the augmentation generator)."""

    def __init__(self, base: SegmentationDataset, transform: JointTransform):
        super().__init__(base)
        self.transform = transform

    def __getitem__(self, index: int):
        return self.transform(*self.base[index])

    def plain_sample(self, index: int):
        return self.base.plain_sample(index)


def synthetic_source(name: str, ds_cfg: Any, data_cfg: Any, *, classes: list[str], **_: Any) -> SyntheticDomain:
    if list(classes) != list(CLASSES):
        raise ConfigError(
            f"data.datasets.{name}: the synthetic source labels {list(CLASSES)}, "
            f"but data.classes is {list(classes)}"
        )
    if ds_cfg.num_images < 1:
        raise ConfigError(f"data.datasets.{name}.num_images must be >= 1, got {ds_cfg.num_images}")
    return SyntheticDomain(ds_cfg.domain, ds_cfg.num_images, data_cfg.size, seed=data_cfg.seed)


SOURCES: dict[str, SourceFn] = {"synthetic": synthetic_source, "folder": folder_source, "voc": voc_source,
                                "cityscapes": cityscapes_source, "fss": fss_source}
ON_DISK = ("folder", "voc", "cityscapes", "fss")  # read files under a root; augment natively


def dataset_root(name: str, ds_cfg: Any, data_cfg: Any) -> Path:
    """``data.root / data.datasets.NAME.root`` (an absolute dataset root wins)."""
    base = data_cfg.get("root")
    sub = ds_cfg.get("root")
    sub = name if sub is None else str(sub)
    if not base and sub in (".", ""):
        raise ConfigError(f"data.root is not set: give the folder the data lives in, data.root=DIR "
                          f"(dataset {name!r} is data.root itself)")
    return Path(os.path.expanduser(str(base))) / os.path.expanduser(sub) if base else Path(os.path.expanduser(sub))


def build_source(name: str, ds_cfg: Any, data_cfg: Any, *, classes: Optional[list[str]] = None,
                 augment: bool = False):
    """The dataset (or ``{part: dataset}``) of entry ``name``; ``augment``: a meta-training dataset."""
    try:
        fn = SOURCES[ds_cfg.source]
    except KeyError:
        raise ConfigError(
            f"data.datasets.{name}.source={ds_cfg.source!r} is not one of {', '.join(sorted(SOURCES))}"
        ) from None
    classes = list(classes) if classes is not None else mix_classes(data_cfg)
    augment = bool(augment and data_cfg.get("augment") is not None and data_cfg.augment.enabled)
    if ds_cfg.source in ON_DISK:
        return fn(name, ds_cfg, data_cfg, root=dataset_root(name, ds_cfg, data_cfg), classes=classes,
                  augment=augment)
    ds = fn(name, ds_cfg, data_cfg, classes=classes, augment=augment)
    if augment:
        transform = JointTransform(int(data_cfg.size), data_cfg.augment, seed=int(data_cfg.seed), name=name)
        ds = Augmented(ds, transform)
    return ds
