"""Dataset sources: how one entry of a mix's ``datasets`` becomes a torch ``Dataset``.

A source is a function ``(name, dataset_cfg, data_cfg) -> Dataset`` yielding
``(image float (3, H, W) in [0, 1], mask int64 (H, W))`` pairs in the mix's label space, at
``data.size``. A new on-disk format is one function here and one YAML in ``conf/data/``.
"""

from __future__ import annotations

from typing import Any, Callable

from torch.utils.data import Dataset

from metaseg.data.synthetic import CLASSES, SyntheticDomain
from metaseg.utils.errors import ConfigError

SourceFn = Callable[[str, Any, Any], Dataset]


def synthetic_source(name: str, ds_cfg: Any, data_cfg: Any) -> Dataset:
    if list(data_cfg.classes) != list(CLASSES):
        raise ConfigError(
            f"data.datasets.{name}: the synthetic source labels {list(CLASSES)}, "
            f"but data.classes is {list(data_cfg.classes)}"
        )
    if ds_cfg.num_images < 1:
        raise ConfigError(f"data.datasets.{name}.num_images must be >= 1, got {ds_cfg.num_images}")
    return SyntheticDomain(ds_cfg.domain, ds_cfg.num_images, data_cfg.size, seed=data_cfg.seed)


SOURCES: dict[str, SourceFn] = {"synthetic": synthetic_source}


def build_source(name: str, ds_cfg: Any, data_cfg: Any) -> Dataset:
    try:
        fn = SOURCES[ds_cfg.source]
    except KeyError:
        raise ConfigError(
            f"data.datasets.{name}.source={ds_cfg.source!r} is not one of {', '.join(sorted(SOURCES))}"
        ) from None
    return fn(name, ds_cfg, data_cfg)
