"""The ``cityscapes`` source: ``gtFine`` label ids mapped to the 19 evaluation (train) ids.

``root`` holds the two archives' folders::

    leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

``split`` picks train / val / test (null: train and val), ``folders`` picks cities (each
city can be a domain of a mix). Label ids 0-33 are declared; the 19 evaluated ones map to
train ids 0-18 (the table of cityscapesScripts' ``labels.py``), the rest to ignore.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metaseg.data.decode import Pair
from metaseg.data.folder import image_limit
from metaseg.data.labels import build_label_map
from metaseg.data.pairs import build_pair_dataset, evenly_spaced, few
from metaseg.utils.errors import ConfigError, DataError
from metaseg.utils.masks import IGNORE

CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle")
# label id -> train id, for the 19 evaluated classes
LABEL_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                  26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
LABEL_IDS = range(34)
IMAGE_TAIL, MASK_TAIL = "_leftImg8bit.png", "_gtFine_labelIds.png"


def cityscapes_pairs(name: str, root: Path, splits, cities) -> list[Pair]:
    if not root.is_dir():
        raise DataError(f"dataset {name!r}: root {root} does not exist; set data.root (or "
                        f"data.datasets.{name}.root) to the folder holding leftImg8bit/ and gtFine/")
    for sub in ("leftImg8bit", "gtFine"):
        if not (root / sub).is_dir():
            raise DataError(f"dataset {name!r}: {root} has no {sub}/ folder (Cityscapes layout: "
                            f"leftImg8bit/<split>/<city>/, gtFine/<split>/<city>/)")
    pairs: list[Pair] = []
    for split in splits:
        gt = root / "gtFine" / split
        if not gt.is_dir():
            raise ConfigError(f"data.datasets.{name}.split: {gt} does not exist (splits: train, val, test)")
        city_dirs = sorted(p for p in gt.iterdir() if p.is_dir())
        if cities is not None:
            known = {p.name for p in city_dirs}
            unknown = [c for c in cities if c not in known]
            if unknown:
                raise ConfigError(f"data.datasets.{name}.folders names cities {unknown} not in {gt} "
                                  f"(has {few(sorted(known), 5)})")
            city_dirs = [p for p in city_dirs if p.name in set(cities)]
        for city in city_dirs:
            for mask in sorted(city.glob(f"*{MASK_TAIL}")):
                stem = mask.name[: -len(MASK_TAIL)]
                pairs.append(Pair(stem, root / "leftImg8bit" / split / city.name / f"{stem}{IMAGE_TAIL}",
                                  mask, split, {"city": city.name}))
    missing = [p.image.name for p in pairs if not p.image.is_file()]
    if missing:
        raise DataError(f"dataset {name!r}: {len(missing)} mask(s) have no image under {root / 'leftImg8bit'}: "
                        f"{few(missing)}; unpack leftImg8bit for the same splits")
    if not pairs:
        raise DataError(f"dataset {name!r}: no *{MASK_TAIL} under {root / 'gtFine'} for splits {list(splits)}")
    return pairs


def cityscapes_source(name: str, ds_cfg: Any, data_cfg: Any, *, root: Path, classes: list[str], augment: bool):
    values = {lid: LABEL_TO_TRAIN.get(lid, IGNORE) for lid in LABEL_IDS}
    labels = build_label_map(name, ds_cfg, classes, default_classes=CITYSCAPES_CLASSES, default_values=values)
    splits = list(ds_cfg.get("split") or ["train", "val"])
    pairs = cityscapes_pairs(name, root, splits, ds_cfg.get("folders"))
    return build_pair_dataset(name, evenly_spaced(pairs, image_limit(ds_cfg, data_cfg)), labels, data_cfg, root,
                              augment, len(classes))
