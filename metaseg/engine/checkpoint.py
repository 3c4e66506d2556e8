"""Checkpoints as plain data: tensors, numbers, strings, lists and dicts, config included.

Loaded with ``torch.load(weights_only=True)``, so a checkpoint someone sends you cannot run
code. Written atomically (temporary file, then rename), so a crash mid-save leaves the
previous checkpoint intact, never a truncated one.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from metaseg import __version__
from metaseg.utils.errors import CheckpointError
from metaseg.utils.runtime import atomic_write

FORMAT = 1


def save_checkpoint(path: str | os.PathLike, **state: Any) -> None:
    payload = {"format": FORMAT, "version": __version__, **state}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint={path!r} does not exist (a run writes <run dir>/checkpoints/last.pt)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt, truncated or code-carrying files alike
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint={path!r} cannot be loaded as plain data (weights_only): {first}"
        ) from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"checkpoint={path!r} is not a metaseg checkpoint (no 'model' and 'config')")
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint={path!r} has format {ckpt.get('format')!r}, this metaseg "
            f"({__version__}) reads format {FORMAT}"
        )
    return ckpt
