"""Tiny on-disk datasets written into ``tmp_path`` for the data tests, and where the real ones live."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from tests.conftest import ROOT

SHARED_DATA = ROOT.parent / "shared" / "data"  # ../shared/data from the repository root


def rgb(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def half_mask(h: int, w: int, fg: int = 255, bg: int = 0) -> np.ndarray:
    """Left half ``fg``, right half ``bg``: easy to check after resizing."""
    m = np.full((h, w), bg, dtype=np.uint8)
    m[:, : w // 2] = fg
    return m


def folder_dataset(root: Path, n: int = 4, h: int = 16, w: int = 20, *, masks: Optional[list] = None,
                   ext: str = ".png", splits: Optional[list[str]] = None,
                   groups: Optional[dict[str, list[str]]] = None) -> Path:
    """``root/images/img{i}`` + ``root/masks/img{i}.png`` (binary half masks unless ``masks`` given)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rgb(h, w, i).save(root / "images" / f"img{i}{ext}")
        mask = masks[i] if masks is not None else half_mask(h, w)
        Image.fromarray(mask).save(root / "masks" / f"img{i}.png")
    if splits is not None:
        (root / "splits.csv").write_text("stem,split\n" + "".join(f"img{i},{s}\n" for i, s in enumerate(splits)))
    if groups is not None:
        cols = list(groups)
        rows = "".join(f"img{i}," + ",".join(groups[c][i] for c in cols) + "\n" for i in range(n))
        (root / "groups.csv").write_text("stem," + ",".join(cols) + "\n" + rows)
    return root
