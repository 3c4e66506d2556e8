"""The ``folder`` source: ``images/`` and ``masks/`` matched by file stem.

Layout (any dataset can be brought to it with a few ``mv``)::

    ROOT/images/<stem>.{png,jpg,...}    the photos
    ROOT/masks/<stem><mask_suffix>.png  class-index masks, or binary 0/255 masks
    ROOT/splits.csv                     optional: stem,split        (keep some: split=[train])
    ROOT/groups.csv                     optional: stem,<group>,...  (keep some: groups={site: [a]})

Every image needs a mask and every mask an image; the first few of each are named if not.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from metaseg.data.decode import IMAGE_EXTS, MASK_EXTS, Pair
from metaseg.data.labels import build_label_map
from metaseg.data.pairs import build_pair_dataset, evenly_spaced, few
from metaseg.utils.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def list_files(folder: Path, exts: tuple[str, ...], name: str, strip: str = "") -> dict[str, Path]:
    """``stem -> path`` of the files of ``folder`` with one of ``exts`` (hidden files skipped).

    A symbolic link that leads nowhere (a loop, a missing target) is listed too, not dropped:
    reading it then fails and names it, like any other file that cannot be read.
    """
    out: dict[str, Path] = {}
    dupes = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not (path.is_file() or broken_link(path)) or path.suffix.lower() not in exts:
            continue
        stem = path.stem
        if strip:
            if not stem.endswith(strip):
                continue
            stem = stem[: -len(strip)]
        if stem in out:
            dupes.append(f"{out[stem].name} / {path.name}")
        out[stem] = path
    if dupes:
        raise DataError(f"dataset {name!r} ({folder}): {len(dupes)} stem(s) have two files: {few(dupes)}; "
                        f"keep one file per stem")
    return out


def broken_link(path: Path) -> bool:
    """A symbolic link whose target cannot be reached (a loop, or a missing file)."""
    return path.is_symlink() and not path.exists()


def read_table(path: Path, name: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    """A ``stem,...`` CSV as its columns and ``stem -> row``."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"dataset {name!r}: cannot read {path} ({exc})") from exc
    if not rows or not rows[0] or rows[0][0].strip() != "stem" or len(rows[0]) < 2:
        raise DataError(f"dataset {name!r}: {path} must start with a header 'stem,<column>'")
    header = [h.strip() for h in rows[0]]
    table = {}
    for row in rows[1:]:
        if row and row[0].strip():
            table[row[0].strip()] = {h: (row[i].strip() if i < len(row) else "") for i, h in enumerate(header)}
    return header[1:], table


def pair_folder(name: str, root: Path, mask_suffix: str = "") -> list[Pair]:
    """All pairs of a folder dataset, with their split and groups; named errors if unpaired."""
    if not root.is_dir():
        raise DataError(f"dataset {name!r}: root {root} does not exist; set data.root (or "
                        f"data.datasets.{name}.root) to the folder holding images/ and masks/")
    if not any(root.iterdir()):
        raise DataError(f"dataset {name!r}: root {root} is empty; put images/ and masks/ there, or point "
                        f"data.root at the data")
    images_dir, masks_dir = root / "images", root / "masks"
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise DataError(f"dataset {name!r}: {root} has no {d.name}/ folder; a folder dataset is "
                            f"images/<stem>.png|jpg and masks/<stem>.png")
    images = list_files(images_dir, IMAGE_EXTS, name)
    masks = list_files(masks_dir, MASK_EXTS, name, mask_suffix)
    if not images:
        raise DataError(f"dataset {name!r}: {images_dir} holds no images ({', '.join(IMAGE_EXTS)}); "
                        f"put the photos there")
    no_mask = sorted(set(images) - set(masks))
    if no_mask:
        raise DataError(f"dataset {name!r}: {len(no_mask)} image(s) have no mask in {masks_dir}: "
                        f"{few([images[s].name for s in no_mask])}; add masks/<stem>{mask_suffix}.png or "
                        f"remove the images")
    no_image = sorted(set(masks) - set(images))
    if no_image:
        raise DataError(f"dataset {name!r}: {len(no_image)} mask(s) have no image in {images_dir}: "
                        f"{few([masks[s].name for s in no_image])}; add the images or remove the masks")
    pairs = [Pair(s, images[s], masks[s]) for s in sorted(images)]
    if (root / "splits.csv").is_file():
        _, splits = read_table(root / "splits.csv", name)
        for p in pairs:
            p.split = splits.get(p.stem, {}).get("split") or None
    if (root / "groups.csv").is_file():
        _, groups = read_table(root / "groups.csv", name)
        for p in pairs:
            p.groups = {k: v for k, v in groups.get(p.stem, {}).items() if k != "stem"}
    return pairs


def select(name: str, pairs: list[Pair], root: Path, split: Optional[list], groups: dict,
           limit: Optional[int]) -> list[Pair]:
    """The pairs kept by ``split``, ``groups`` and the ``max_images`` cap."""
    key = f"data.datasets.{name}"
    if split is not None:
        if not (root / "splits.csv").is_file():
            raise ConfigError(f"{key}.split={list(split)} but {root / 'splits.csv'} does not exist; "
                              f"drop {key}.split or add splits.csv (stem,split)")
        known = sorted({p.split for p in pairs if p.split})
        unknown = [s for s in split if s not in known]
        if unknown:
            raise ConfigError(f"{key}.split names {unknown}, not in splits.csv (has {known})")
        pairs = [p for p in pairs if p.split in set(split)]
    groups = OmegaConf.to_container(groups) if OmegaConf.is_config(groups) else groups
    if groups is not None and not isinstance(groups, dict):
        raise ConfigError(f"{key}.groups must be a mapping such as {{site: [a, b]}}, got {groups!r}")
    for column, wanted in (groups or {}).items():
        if isinstance(wanted, (str, int)):
            wanted = [wanted]
        if not (root / "groups.csv").is_file():
            raise ConfigError(f"{key}.groups filters on {column!r} but {root / 'groups.csv'} does not exist")
        columns = read_table(root / "groups.csv", name)[0]
        if column not in columns:
            raise ConfigError(f"{key}.groups: groups.csv has no column {column!r} (has {columns})")
        wanted = {str(w) for w in wanted}
        pairs = [p for p in pairs if p.groups.get(column) in wanted]
    return evenly_spaced(pairs, limit)


def image_limit(ds_cfg: Any, data_cfg: Any) -> Optional[int]:
    caps = [c for c in (ds_cfg.get("max_images"), data_cfg.get("max_images")) if c is not None]
    return min(caps) if caps else None


def folder_source(name: str, ds_cfg: Any, data_cfg: Any, *, root: Path, classes: list[str], augment: bool):
    labels = build_label_map(name, ds_cfg, classes)
    pairs = pair_folder(name, root, ds_cfg.get("mask_suffix") or "")
    pairs = select(name, pairs, root, ds_cfg.get("split"), ds_cfg.get("groups"), image_limit(ds_cfg, data_cfg))
    return build_pair_dataset(name, pairs, labels, data_cfg, root, augment, len(classes))
