"""Reading image and mask files with Pillow, with every failure turned into a named problem.

Two passes keep bad data cheap to find: :func:`probe` reads only headers (size, mode), so
a missing, unreadable or mismatched file is reported in a second even for a large dataset;
:func:`decode_pair` then decodes pixels, which finds truncated files and undeclared mask
values. Large JPEGs are decoded at a reduced scale (``Image.draft``, the DCT-domain
shrink) when the cache needs far fewer pixels than the file holds.

An image or mask of more than ``MAX_PIXELS`` (Pillow's decompression-bomb threshold, about
9459 x 9459) is refused from its header, before a pixel is decoded, with one line naming its
size: a 10000 x 10000 PNG would take gigabytes on its way through a model at full size, and
downscaling it here would give masks of another size than the image. Such files are
reported like unreadable ones (``metaseg-data`` stops naming them, ``metaseg-predict`` skips
them and lists them); Pillow's own two-line warning is not shown.
"""

from __future__ import annotations

import re
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from metaseg.data.labels import LabelMap

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
MASK_EXTS = (".png", ".bmp", ".tif", ".tiff", ".gif")
INDEX_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B", "1")
MAX_PIXELS = 89_478_485  # Pillow's default Image.MAX_IMAGE_PIXELS
_OPENING = threading.Lock()  # warnings filters are process-wide: one open at a time changes them


class ImageTooLarge(ValueError):
    """An image file with more pixels than ``MAX_PIXELS``."""


def _too_large(pixels: int, size: str = "") -> ImageTooLarge:
    return ImageTooLarge(f"{size}{pixels / 1e6:.0f} megapixels, more than the {MAX_PIXELS / 1e6:.0f} metaseg "
                         f"decodes; downscale it or cut it into tiles")


def open_image(path: Path) -> Image.Image:
    """``Image.open`` (header only), refusing an image of more than ``MAX_PIXELS`` before it is decoded."""
    with _OPENING, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as exc:  # over twice Pillow's limit: refused by Pillow itself
            found = re.search(r"\((\d+) pixels\)", str(exc))
            raise _too_large(int(found.group(1)) if found else 2 * MAX_PIXELS + 1) from None
    w, h = im.size
    if w * h > MAX_PIXELS:
        im.close()
        raise _too_large(w * h, f"{w}x{h}, ")
    return im


@dataclass
class Pair:
    """One labelled image: its files and the metadata its dataset's lists give it."""

    stem: str
    image: Path
    mask: Path
    split: Optional[str] = None
    groups: dict = field(default_factory=dict)


@dataclass
class Probe:
    size: tuple[int, int]  # (W, H) of the image
    problem: Optional[tuple[str, str]] = None  # (kind, detail)


def error_reason(exc: BaseException) -> str:
    """One line saying why a file could not be read (the caller names the file)."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return exc.strerror  # "Too many levels of symbolic links", without the path again
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def probe(pair: Pair, labels: LabelMap) -> Probe:
    """Headers only: readable files, equal sizes, a single-channel mask."""
    try:
        with open_image(pair.image) as im:
            isize = im.size
    except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for bad files
        return Probe((0, 0), ("unreadable", f"{pair.image.name} ({error_reason(exc)})"))
    try:
        with open_image(pair.mask) as m:
            msize, mode = m.size, m.mode
    except Exception as exc:  # noqa: BLE001
        return Probe(isize, ("unreadable", f"{pair.mask.name} ({error_reason(exc)})"))
    if msize != isize:
        return Probe(isize, ("size", f"{pair.stem} (image {isize[0]}x{isize[1]}, mask {msize[0]}x{msize[1]})"))
    if mode not in INDEX_MODES and labels.threshold is None:
        return Probe(isize, ("rgb", f"{pair.mask.name} (mode {mode})"))
    return Probe(isize)


def read_mask(path: Path, labels: LabelMap) -> np.ndarray:
    """Raw mask values (H, W): palette indices stay indices; RGB is greyed only when thresholding."""
    with open_image(path) as m:
        if m.mode == "1":
            m = m.convert("L")
        elif m.mode not in INDEX_MODES:
            m = m.convert("L")  # probe() let it through: a threshold is declared
        raw = np.asarray(m)
    if raw.dtype == bool:
        raw = raw.astype(np.uint8) * 255
    return labels.prepare(raw)


def read_image(path: Path, shrink_to: Optional[tuple[int, int]] = None) -> Image.Image:
    """The image as RGB; ``shrink_to=(W, H)`` lets a JPEG decode at up to 8x smaller scale first."""
    im = open_image(path)
    if shrink_to is not None and im.format == "JPEG":
        im.draft("RGB", shrink_to)
    im = im.convert("RGB")
    im.load()
    return im


def fit_image(image: Image.Image, out_hw: tuple[int, int]) -> Image.Image:
    """``image`` resized to ``out_hw`` = (H, W) as every dataset image is (bilinear, antialiased)."""
    h, w = out_hw
    if image.size == (w, h):
        return image
    return image.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=2.0)


def decode_pair(pair: Pair, labels: LabelMap, out_hw: Optional[tuple[int, int]]):
    """``(image uint8 (H, W, 3), mix-id mask uint8 (H, W))`` at ``out_hw`` (None: original size).

    Returns ``(None, (kind, detail))`` for a truncated file or undeclared mask values.
    """
    try:
        raw = read_mask(pair.mask, labels)
    except Exception as exc:  # noqa: BLE001
        return None, ("unreadable", f"{pair.mask.name} ({error_reason(exc)})")
    bad = labels.undeclared(raw)
    if bad:
        shown = ", ".join(map(str, bad[:6])) + (" ..." if len(bad) > 6 else "")
        return None, ("values", f"{pair.mask.name} (values {shown})")
    mask = Image.fromarray(labels.apply(raw))
    try:
        image = read_image(pair.image, None if out_hw is None else (out_hw[1], out_hw[0]))
    except Exception as exc:  # noqa: BLE001
        return None, ("unreadable", f"{pair.image.name} ({error_reason(exc)})")
    if out_hw is not None:
        h, w = out_hw
        image = fit_image(image, out_hw)
        if mask.size != (w, h):
            mask = mask.resize((w, h), Image.Resampling.NEAREST)
    return (np.array(image), np.array(mask)), None
