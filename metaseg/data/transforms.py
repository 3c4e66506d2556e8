"""Joint image/mask transforms on torchvision.transforms.v2 and tv_tensors.

The image is a ``tv_tensors.Image`` and the mask a ``tv_tensors.Mask``, so one v2 pipeline
moves both together: geometric ops resize masks with nearest interpolation (labels are never
blended, 255 stays 255) and photometric ops leave masks alone. Held-out and evaluation data
are only resized to ``data.size``; meta-training data (``data.augment.enabled``) get a
random-resized crop to ``data.size``, flips and optional colour jitter.

Augmentation draws from its own generator, seeded by ``data.seed`` and the dataset name, so
the same config gives the same crops on every run, and training and other code that draw
from torch's global generator do not shift each other's random streams.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Optional

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from metaseg.utils.errors import ConfigError

Transform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
CACHE_FACTOR = 2  # augmented datasets are cached at 2 x data.size on the shorter side


def working_hw(width: int, height: int, size: int, augment: bool) -> tuple[int, int]:
    """Height and width an image is cached at: ``size x size`` for resize-only data; for
    augmented data, the aspect ratio kept and the shorter side ``2 * size`` (never enlarged),
    so a random crop still has pixels to spare."""
    if not augment:
        return size, size
    short = min(width, height)
    scale = min(1.0, CACHE_FACTOR * size / short)
    return max(size, round(height * scale)), max(size, round(width * scale))


def _pipeline(size: int, aug: Optional[Any]) -> v2.Transform:
    if aug is None or not aug.enabled:
        return v2.Resize((size, size), antialias=True)
    scale, ratio = tuple(aug.scale), tuple(aug.ratio)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"data.augment.scale={list(scale)} must be [low, high] with 0 < low <= high <= 1")
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
        raise ConfigError(f"data.augment.ratio={list(ratio)} must be [low, high] with 0 < low <= high")
    for key in ("hflip", "vflip"):
        if not 0 <= aug[key] <= 1:
            raise ConfigError(f"data.augment.{key}={aug[key]} is a probability: use a value in [0, 1]")
    if aug.jitter < 0:
        raise ConfigError(f"data.augment.jitter={aug.jitter} must be >= 0")
    ops: list = [v2.RandomResizedCrop((size, size), scale=scale, ratio=ratio, antialias=True)]
    if aug.hflip:
        ops.append(v2.RandomHorizontalFlip(aug.hflip))
    if aug.vflip:
        ops.append(v2.RandomVerticalFlip(aug.vflip))
    if aug.jitter:
        ops.append(v2.ColorJitter(brightness=aug.jitter, contrast=aug.jitter, saturation=aug.jitter))
    return v2.Compose(ops)


class JointTransform:
    """``(image (3, H, W) uint8 or float, mask (H, W)) -> (float (3, size, size) in [0, 1], int64 mask)``."""

    def __init__(self, size: int, aug: Optional[Any] = None, *, seed: int = 0, name: str = ""):
        self.size = size
        self.random = aug is not None and bool(aug.enabled)
        self.ops = _pipeline(size, aug)
        self.generator = torch.Generator().manual_seed(
            (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % 2**63)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img, msk = tv_tensors.Image(image), tv_tensors.Mask(mask)
        if self.random:
            draw = int(torch.randint(0, 2**62, (1,), generator=self.generator))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(draw)
                img, msk = self.ops(img, msk)
        elif tuple(img.shape[-2:]) != (self.size, self.size):
            img, msk = self.ops(img, msk)
        img = img.as_subclass(torch.Tensor)
        if img.dtype == torch.uint8:
            img = img.float().div_(255)
        return img.contiguous(), msk.as_subclass(torch.Tensor).long()
