"""The ``fss`` source: the FSS-1000 layout, one folder per class, each class a binary task.

::

    ROOT/<class>/<N>.jpg   the photos
    ROOT/<class>/<N>.png   the masks: object 255, background 0 (some are RGB or anti-aliased,
                           so they are greyed and thresholded at 128, as HSNet and PANet do)

The source returns one dataset per class folder, named ``<dataset>/<class>``; a mix samples
the classes as its tasks (each class's share of the dataset's weight is equal) and evaluates
each held-out class on its own. ``folders`` lists the classes to use (null: all), or names
one ``.txt`` file under ``ROOT`` with a class per line (FSS-1000's train/val/test lists).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metaseg.data.decode import Pair
from metaseg.data.folder import image_limit
from metaseg.data.labels import build_label_map
from metaseg.data.pairs import build_pair_dataset, evenly_spaced, few
from metaseg.data.view import IndexView
from metaseg.utils.errors import ConfigError, DataError

FSS_THRESHOLD = 128


def fss_classes(name: str, root: Path, folders) -> list[Path]:
    if not root.is_dir():
        raise DataError(f"dataset {name!r}: root {root} does not exist; set data.root (or "
                        f"data.datasets.{name}.root) to the folder of FSS-1000 class folders")
    dirs = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    if not dirs:
        raise DataError(f"dataset {name!r}: {root} holds no class folders (FSS-1000: <class>/<N>.jpg + <N>.png)")
    if folders is None:
        return list(dirs.values())
    folders = list(folders)
    if len(folders) == 1 and str(folders[0]).endswith(".txt"):
        listing = root / str(folders[0])
        if not listing.is_file():
            raise ConfigError(f"data.datasets.{name}.folders: {listing} does not exist")
        folders = listing.read_text().split()
    unknown = [f for f in folders if f not in dirs]
    if unknown:
        raise ConfigError(f"data.datasets.{name}.folders names {len(unknown)} class folder(s) not in {root}: "
                          f"{few(unknown)}")
    return [dirs[f] for f in folders]


def fss_pairs(name: str, folder: Path) -> list[Pair]:
    images = {p.stem: p for p in folder.glob("*.jpg")}
    masks = {p.stem: p for p in folder.glob("*.png")}
    no_mask = sorted(set(images) - set(masks))
    if no_mask:
        raise DataError(f"dataset {name!r}: {len(no_mask)} image(s) in {folder} have no mask: "
                        f"{few([images[s].name for s in no_mask])}; add <N>.png or remove the images")
    no_image = sorted(set(masks) - set(images))
    if no_image:
        raise DataError(f"dataset {name!r}: {len(no_image)} mask(s) in {folder} have no image: "
                        f"{few([masks[s].name for s in no_image])}; add <N>.jpg or remove the masks")
    return [Pair(f"{folder.name}/{s}", images[s], masks[s], None, {"class": folder.name})
            for s in sorted(images, key=lambda s: (len(s), s))]


def fss_source(name: str, ds_cfg: Any, data_cfg: Any, *, root: Path, classes: list[str], augment: bool):
    labels = build_label_map(name, ds_cfg, classes, default_classes=("background", "foreground"),
                             default_threshold=FSS_THRESHOLD)
    limit = image_limit(ds_cfg, data_cfg)
    pairs, spans = [], {}
    for folder in fss_classes(name, root, ds_cfg.get("folders")):
        mine = evenly_spaced(fss_pairs(name, folder), limit)
        if not mine:
            raise DataError(f"dataset {name!r}: class folder {folder} holds no <N>.jpg/<N>.png pairs")
        spans[folder.name] = range(len(pairs), len(pairs) + len(mine))
        pairs.extend(mine)
    base = build_pair_dataset(name, pairs, labels, data_cfg, root, augment, len(classes))
    return {cls: IndexView(base, list(span)) for cls, span in spans.items()}
