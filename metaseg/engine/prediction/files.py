"""The files of ``metaseg-predict``: the images it reads, the masks and overlays it writes.

* **Images**: every file of the ``images`` folder with an image extension (not searched
  recursively; hidden files skipped), read as RGB with Pillow. One that cannot be read is
  reported, never fatal: the caller skips it and names it at the end.
* **Masks** (``masks/<stem>.png``, the image's own width and height): with ``masks=index`` a
  palette PNG whose pixel values are class ids (0..K-1) and whose palette colours them as
  the evaluation pictures do (binary: black/white), so ``numpy.array(Image.open(f))`` gives
  the ids and an image viewer shows the classes; with ``masks=support`` the values the
  support masks use for each class (binary 0/255, or the ``mask_values`` mapping inverted),
  so the output folder can be read back with the same ``data`` options.
* **Overlays** (``overlays/<stem>.png``): the image with every class but class 0 painted
  over it at ``overlay_alpha``, and a legend strip below naming each colour and its share of
  the pixels.

Every file is written atomically (``atomic_write``): a reader, or a run killed mid-way,
sees the previous file or the complete new one, never a half-written PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from metaseg.data.decode import IMAGE_EXTS, error_reason, read_image
from metaseg.data.folder import list_files
from metaseg.data.labels import LabelMap
from metaseg.engine.evaluation.report import PALETTE, draw_legend, legend_lines, load_font, palette
from metaseg.utils.errors import ConfigError, DataError
from metaseg.utils.runtime import atomic_write

MASK_FORMATS = ("index", "support")
LEGEND_MIN_WIDTH = 320  # overlays of small images are widened so that the legend fits


def list_images(folder: Path) -> list[Path]:
    """The images to segment, sorted by stem; one line naming the fix if there are none."""
    if not folder.is_dir():
        raise ConfigError(f"images={str(folder)!r} is not a folder; point images= at the folder of images to segment")
    files = list_files(folder, IMAGE_EXTS, "images")
    if not files:
        raise DataError(f"images={str(folder)!r} holds no images ({', '.join(IMAGE_EXTS)}); put the images to "
                        f"segment there (sub-folders are not searched)")
    return list(files.values())


def load_rgb(path: Path) -> tuple[Optional[Image.Image], Optional[str]]:
    """``(RGB image, None)``, or ``(None, why)`` for a file that cannot be read."""
    try:
        return read_image(path), None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for bad files
        return None, error_reason(exc)


def support_values(labels: LabelMap, classes: Sequence[str]) -> np.ndarray:
    """Class id -> the raw value support masks use for it (the smallest, if several); ``masks=support``."""
    raw = np.flatnonzero(labels.declared)
    ids = labels.lut[raw]
    out = np.zeros(len(classes), dtype=np.int64)
    for c, name in enumerate(classes):
        hits = raw[ids == c]
        if not hits.size:
            raise ConfigError(f"masks=support: no value of the support masks means class {name!r}, so it cannot be "
                              f"written as one; use masks=index (class ids)")
        out[c] = hits.min()
    return out


class MaskWriter:
    """Writes label maps as mask PNGs (see the module docstring), atomically."""

    def __init__(self, classes: Sequence[str], values: Optional[np.ndarray] = None):
        self.classes = list(classes)
        self.values = values
        colours = palette(len(self.classes))
        self.palette = [v for c in colours for v in c] + [0, 0, 0] * (256 - len(colours))

    def image(self, labels: np.ndarray) -> Image.Image:
        if self.values is None:
            im = Image.fromarray(labels.astype(np.uint8))
            im.putpalette(self.palette)  # an L image with a palette becomes a P image; values stay class ids
            return im
        raw = self.values[labels]
        return Image.fromarray(raw.astype(np.uint8 if raw.max(initial=0) <= 255 else np.uint16))

    def save(self, labels: np.ndarray, path: Path) -> None:
        im = self.image(labels)
        atomic_write(path, lambda tmp: im.save(tmp, format="PNG"))


def overlay_colours(num_classes: int) -> list[tuple[int, int, int]]:
    """Class colours of the overlays: the evaluation palette, but a binary foreground is green, not white
    (white vanishes on bright images, red on the reddish tissue of fundus, endoscopy and skin photos)."""
    return [(0, 0, 0), PALETTE[2]] if num_classes == 2 else palette(num_classes)


def overlay(image: Image.Image, labels: np.ndarray, classes: Sequence[str], alpha: float) -> Image.Image:
    """The image with classes 1..K-1 painted over it, and a legend (colour, name, pixel share) below."""
    rgb = np.array(image, dtype=np.uint8)  # only the painted pixels go through float: large photos stay cheap
    k = len(classes)
    colours = overlay_colours(k)
    lut = np.asarray(colours, dtype=np.float32)
    painted = labels > 0
    blend = (1 - alpha) * rgb[painted].astype(np.float32) + alpha * lut[labels[painted]]
    rgb[painted] = np.clip(blend + 0.5, 0, 255).astype(np.uint8)
    h, w = labels.shape
    counts = np.bincount(labels.ravel(), minlength=k)[:k] / max(labels.size, 1)
    entries = [(colours[c], f"{classes[c]}  {100 * counts[c]:.1f}%") for c in range(1, k)]
    entries.insert(0, ((255, 255, 255), f"{classes[0]} (not painted)  {100 * counts[0]:.1f}%"))
    width = max(w, LEGEND_MIN_WIDTH)
    size = max(13, round(width / 60))
    font, box = load_font(size), size + 3
    margin = box // 2
    lines = legend_lines(entries, width, font, box=box, margin=margin)
    strip = len(lines) * (box * 22 // 16) + 2 * margin
    canvas = Image.new("RGB", (width, h + strip), (255, 255, 255))
    canvas.paste(Image.fromarray(rgb), (0, 0))
    draw_legend(ImageDraw.Draw(canvas), lines, h + margin, font, box=box)
    return canvas


def save_overlay(image: Image.Image, labels: np.ndarray, classes: Sequence[str], alpha: float, path: Path) -> None:
    im = overlay(image, labels, classes, alpha)
    atomic_write(path, lambda tmp: im.save(tmp, format="PNG"))
