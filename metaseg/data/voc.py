"""The ``voc`` source: PASCAL VOC's VOCdevkit layout, 21 classes, 255 = void.

``root`` is ``VOCdevkit`` (the newest ``VOC20xx`` inside is used) or a ``VOC20xx`` folder::

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png            palette PNG: the palette index is the class id
    ImageSets/Segmentation/<split>.txt    ids of train, val, trainval (split=[train])

Masks must stay palette (or greyscale) PNGs; a mask re-saved as RGB colours is reported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metaseg.data.decode import Pair
from metaseg.data.folder import image_limit
from metaseg.data.labels import build_label_map
from metaseg.data.pairs import build_pair_dataset, evenly_spaced, few
from metaseg.utils.errors import ConfigError, DataError

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")


def voc_base(name: str, root: Path) -> Path:
    if not root.is_dir():
        raise DataError(f"dataset {name!r}: root {root} does not exist; set data.root (or "
                        f"data.datasets.{name}.root) to VOCdevkit or VOC2012")
    if (root / "JPEGImages").is_dir():
        return root
    years = sorted(p for p in root.glob("VOC20*") if (p / "JPEGImages").is_dir())
    if not years:
        raise DataError(f"dataset {name!r}: {root} is neither VOCdevkit (with VOC20xx/) nor a VOC20xx folder "
                        f"(with JPEGImages/, SegmentationClass/)")
    return years[-1]


def voc_pairs(name: str, base: Path, split) -> list[Pair]:
    masks_dir, images_dir = base / "SegmentationClass", base / "JPEGImages"
    if not masks_dir.is_dir():
        raise DataError(f"dataset {name!r}: {base} has no SegmentationClass/ folder")
    pairs: list[Pair] = []
    if split is None:
        ids = sorted(p.stem for p in masks_dir.glob("*.png"))
        split_of = {i: None for i in ids}
    else:
        split_of = {}
        for s in split:
            listing = base / "ImageSets" / "Segmentation" / f"{s}.txt"
            if not listing.is_file():
                raise ConfigError(f"data.datasets.{name}.split: {listing} does not exist "
                                  f"(VOC splits: train, val, trainval)")
            for line in listing.read_text().split():
                split_of.setdefault(line.strip(), s)
        ids = sorted(split_of)
    if not ids:
        raise DataError(f"dataset {name!r}: {masks_dir} holds no masks")
    missing_masks = [i for i in ids if not (masks_dir / f"{i}.png").is_file()]
    if missing_masks:
        raise DataError(f"dataset {name!r}: {len(missing_masks)} listed image(s) have no mask in {masks_dir}: "
                        f"{few(missing_masks)}; restore SegmentationClass/ or fix the split list")
    missing_images = [i for i in ids if not (images_dir / f"{i}.jpg").is_file()]
    if missing_images:
        raise DataError(f"dataset {name!r}: {len(missing_images)} mask(s) have no image in {images_dir}: "
                        f"{few([i + '.png' for i in missing_images])}; restore JPEGImages/")
    for i in ids:
        pairs.append(Pair(i, images_dir / f"{i}.jpg", masks_dir / f"{i}.png", split_of[i]))
    return pairs


def voc_source(name: str, ds_cfg: Any, data_cfg: Any, *, root: Path, classes: list[str], augment: bool):
    labels = build_label_map(name, ds_cfg, classes, default_classes=VOC_CLASSES)
    base = voc_base(name, root)
    pairs = evenly_spaced(voc_pairs(name, base, ds_cfg.get("split")), image_limit(ds_cfg, data_cfg))
    return build_pair_dataset(name, pairs, labels, data_cfg, base, augment, len(classes))
