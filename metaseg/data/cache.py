"""Decode once: resized images and mapped masks kept in memory, and optionally on disk.

A meta-step draws ``meta_batch * (shots + query)`` images; decoding a photo takes longer
than a forward pass of a small model at 64 px, so every file is decoded once, when its
dataset is built, resized to the working resolution and kept as uint8. ``data.cache: disk``
also writes each entry to ``data.cache_dir`` (``.npz``, written atomically), keyed by the
files' paths, sizes and modification times, the working resolution and the label map, so a
later run, or another process, skips decoding; a changed file or mapping misses the cache.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

import numpy as np

from metaseg.data.decode import Pair
from metaseg.data.labels import LabelMap
from metaseg.utils.errors import ConfigError
from metaseg.utils.runtime import atomic_write

CACHE_MODES = ("memory", "disk")
DEFAULT_CACHE_DIR = ".cache/metaseg"


class DiskCache:
    """``key -> (image, mask)`` arrays in one folder; ``None`` when disabled."""

    def __init__(self, folder: Path):
        self.folder = folder
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"data.cache_dir={str(folder)!r} cannot be created ({exc}); "
                              f"point data.cache_dir at a writable folder") from exc

    @staticmethod
    def key(pair: Pair, out_hw: tuple[int, int], labels: LabelMap) -> str:
        h = hashlib.sha1()
        for path in (pair.image, pair.mask):
            st = path.stat()
            h.update(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|".encode())
        h.update(f"{out_hw}|{labels.threshold}|".encode())
        h.update(labels.lut.tobytes())
        h.update(np.packbits(labels.declared).tobytes())
        return h.hexdigest()

    def get(self, key: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
        path = self.folder / f"{key}.npz"
        if not path.is_file():
            return None
        try:
            with np.load(path) as z:
                return z["image"], z["mask"]
        except Exception:  # noqa: BLE001 - a damaged entry is a miss, rewritten below
            return None

    def put(self, key: str, image: np.ndarray, mask: np.ndarray) -> None:
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, image=image, mask=mask)

        atomic_write(self.folder / f"{key}.npz", write)


def disk_cache(data_cfg) -> Optional[DiskCache]:
    mode = data_cfg.get("cache", "memory")
    if mode not in CACHE_MODES:
        raise ConfigError(f"data.cache={mode!r} is not one of {', '.join(CACHE_MODES)}")
    if mode != "disk":
        return None
    return DiskCache(Path(os.path.expanduser(data_cfg.get("cache_dir") or DEFAULT_CACHE_DIR)))
