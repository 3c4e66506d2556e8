"""Label spaces: what a dataset's mask values mean, and how they land in the mix's classes.

Two steps, each declared in config and checked before any training:

1. **Values -> dataset classes.** A dataset declares its own classes (``classes``, index =
   class id) and which raw mask value means which class (``mask_values``). Defaults: binary masks
   (``binary: true``, the default for a two-class dataset) map 0 -> class 0 and 255 -> class 1;
   index masks map value ``v`` -> class ``v``. ``ignore_values`` (and 255 for index masks) mean
   void. Any other value in a mask is a data error, so a mislabelled file never trains silently.
2. **Dataset classes -> mix classes.** ``map`` sends a dataset class (name or id) to a mix class
   (name or id, or ``ignore``); classes it does not name go to the mix class of the same name,
   and classes with no match become ignore (255), which the loss and the metrics skip.

The result is one lookup table from raw value to mix id, applied once, when a mask is decoded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from omegaconf import OmegaConf

from metaseg.utils.errors import ConfigError
from metaseg.utils.masks import IGNORE

LUT_SIZE = 1 << 16  # 8- and 16-bit masks
log = logging.getLogger(__name__)


def mix_classes(data_cfg: Any) -> list[str]:
    """The mix's label space: ``data.classes``, or ``data.num_classes`` generic names."""
    classes = list(data_cfg.classes) if data_cfg.get("classes") is not None else None
    n = data_cfg.get("num_classes")
    if n is not None:
        if n < 2:
            raise ConfigError(f"data.num_classes={n} must be >= 2 (background and at least one class)")
        if classes is None or len(classes) != n:
            classes = ["background"] + [f"class_{i}" for i in range(1, n)]
    if not classes:
        raise ConfigError("data.classes is not set: list the mix's classes (data.classes=[background,...]) "
                          "or give data.num_classes=N")
    if len(set(classes)) != len(classes):
        raise ConfigError(f"data.classes={classes} names a class twice")
    if len(classes) >= IGNORE:
        raise ConfigError(f"data.classes has {len(classes)} classes; at most {IGNORE - 1} fit (255 = ignore)")
    return classes


@dataclass(frozen=True)
class LabelMap:
    """Raw mask value -> mix class id (255 = ignore), and which raw values are declared."""

    dataset: str
    lut: np.ndarray  # (LUT_SIZE,) uint8
    declared: np.ndarray  # (LUT_SIZE,) bool
    threshold: Optional[int] = None  # binary masks: grey >= threshold becomes 255 before the lut

    def declared_values(self) -> list[int]:
        return np.flatnonzero(self.declared).tolist()

    def undeclared(self, raw: np.ndarray) -> list[int]:
        """The values of ``raw`` no declaration covers (empty when the mask is fine)."""
        values = np.unique(raw)
        inside = (values >= 0) & (values < LUT_SIZE)
        bad = values[~inside].tolist() + values[inside][~self.declared[values[inside]]].tolist()
        return sorted(int(v) for v in bad)

    def prepare(self, raw: np.ndarray) -> np.ndarray:
        """Apply the threshold (binary masks with in-between values), if any."""
        if self.threshold is None:
            return raw
        return np.where(raw >= self.threshold, 255, 0).astype(np.uint8)

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """Mix ids (uint8, 255 = ignore) of a mask already checked with :meth:`undeclared`."""
        return self.lut[raw]


def _mapping(value: Any, key: str, example: str) -> dict:
    """A config mapping (null: empty); anything else is a one-line error."""
    if value is None:
        return {}
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key} must be a mapping such as {example}, got {value!r}")
    return dict(value)


def _class_id(key: Any, classes: Sequence[str], where: str) -> int:
    """A class given by name or id, as an id into ``classes``."""
    if isinstance(key, str) and key in classes:
        return classes.index(key)
    if isinstance(key, bool):
        raise ConfigError(f"{where}: {key!r} is not a class name or id of {list(classes)}")
    try:
        i = int(key)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {key!r} is not one of {list(classes)} (name or id)") from None
    if not 0 <= i < len(classes):
        raise ConfigError(f"{where}: class id {i} is out of range 0..{len(classes) - 1} ({list(classes)})")
    return i


def _is_ignore(target: Any) -> bool:
    return target is None or (isinstance(target, str) and target.lower() in ("ignore", "void")) or (
        not isinstance(target, bool) and isinstance(target, int) and target == IGNORE)


def build_label_map(name: str, ds_cfg: Any, classes: Sequence[str], *,
                    default_classes: Optional[Sequence[str]] = None,
                    default_values: Optional[Mapping[int, int]] = None,
                    default_ignore: Sequence[int] = (),
                    default_threshold: Optional[int] = None) -> LabelMap:
    """The label map of dataset ``name`` (a ``DatasetConfig``) into the mix's ``classes``.

    ``default_*`` are what a format fixes when the config leaves the field null (VOC's 21
    classes, Cityscapes' label ids, ...).
    """
    key = f"data.datasets.{name}"
    ds_classes = list(ds_cfg.get("classes") or default_classes or classes)
    values = dict(_mapping(ds_cfg.get("mask_values"), f"{key}.mask_values", "{0: 0, 255: 1}")) or None
    if values is None and default_values is not None:
        values = dict(default_values)
    binary = ds_cfg.get("binary")
    threshold = ds_cfg.get("threshold")
    threshold = default_threshold if threshold is None else threshold
    if binary is None:
        binary = values is None and len(ds_classes) == 2
    if binary:
        if values is not None:
            raise ConfigError(f"{key}: binary=true fixes the values (0 -> class 0, 255 -> class 1); "
                              f"drop {key}.mask_values or set {key}.binary=false")
        if len(ds_classes) != 2:
            raise ConfigError(f"{key}: binary=true needs exactly two classes, got {ds_classes}")
        values = {0: 0, 255: 1}
    elif threshold is not None:
        raise ConfigError(f"{key}.threshold applies to binary masks only; set {key}.binary=true")
    ignore = {int(v) for v in list(ds_cfg.get("ignore_values") or []) + list(default_ignore)}
    if values is None:
        values = {v: v for v in range(len(ds_classes))}
        ignore.add(IGNORE)
    for raw, cid in values.items():
        if isinstance(raw, bool) or not isinstance(raw, int) or isinstance(cid, bool) or not isinstance(cid, int):
            raise ConfigError(f"{key}.mask_values maps mask values to class ids, both integers; got {raw!r}: {cid!r}")
        if not 0 <= int(raw) < LUT_SIZE:
            raise ConfigError(f"{key}.mask_values: mask value {raw} is out of range 0..{LUT_SIZE - 1}")
        if int(cid) != IGNORE and not 0 <= int(cid) < len(ds_classes):
            raise ConfigError(f"{key}.mask_values: {raw} -> {cid}, but the dataset's classes are "
                              f"0..{len(ds_classes) - 1} ({ds_classes}); 255 means ignore")

    # dataset class id -> mix id
    to_mix = np.full(len(ds_classes), IGNORE, dtype=np.int64)
    explicit = set()
    for src, dst in _mapping(ds_cfg.get("map"), f"{key}.map", "{vessel: foreground}").items():
        cid = _class_id(src, ds_classes, f"{key}.map key")
        to_mix[cid] = IGNORE if _is_ignore(dst) else _class_id(dst, classes, f"{key}.map[{src!r}]")
        explicit.add(cid)
    unmapped = []
    for cid, cname in enumerate(ds_classes):
        if cid in explicit:
            continue
        if cname in classes:
            to_mix[cid] = classes.index(cname)
        else:
            unmapped.append(cname)
    if (to_mix == IGNORE).all():
        raise ConfigError(f"{key}: none of its classes {ds_classes} maps into data.classes {list(classes)}; "
                          f"add {key}.map={{{ds_classes[-1]}: {classes[-1]}}} (dataset class -> mix class)")
    if unmapped:
        log.info("dataset %r: classes %s are not in data.classes and are ignored (255); map them with %s.map",
                 name, unmapped, key)

    lut = np.full(LUT_SIZE, IGNORE, dtype=np.uint8)
    declared = np.zeros(LUT_SIZE, dtype=bool)
    for raw, cid in values.items():
        declared[int(raw)] = True
        lut[int(raw)] = IGNORE if int(cid) == IGNORE else to_mix[int(cid)]
    for raw in ignore:
        if 0 <= raw < LUT_SIZE and int(raw) not in values:
            declared[raw] = True
            lut[raw] = IGNORE
    return LabelMap(name, lut, declared, threshold)
