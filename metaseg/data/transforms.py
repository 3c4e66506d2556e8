"""Joint image/mask transforms on torchvision.transforms.v2 and tv_tensors.

The image is a ``tv_tensors.Image`` and the mask a ``tv_tensors.Mask``, and the same v2
functional op with the same parameters moves both: on a ``Mask`` geometric ops use nearest
interpolation (labels are never blended, 255 stays 255); photometric ops touch the image only. Held-out and evaluation data
are only resized to ``data.size``; meta-training data (``data.augment.enabled``) get a
random-resized crop to ``data.size``, flips and optional colour jitter.

A model trained on two imaging sites meets a third with another camera: other colours,
contrast, resolution, blur and noise. The site options (``zoom``, ``gamma``, ``blur``, ``hue``,
``grayscale``, ``noise``) widen the training distribution along those axes; all are off by
default, and an option that is off draws nothing, so the crops of a config without them stay
exactly what they were.

Augmentation draws its parameters from its own ``torch.Generator``, seeded by ``data.seed``
and the dataset name, so the same config gives the same crops on every run, and model code
drawing from torch's global generator does not shift the augmentation stream (or back).
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Optional

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from metaseg.utils.errors import ConfigError
from metaseg.utils.masks import IGNORE

CACHE_FACTOR = 2  # augmented datasets are cached at 2 x data.size on the shorter side


def working_hw(width: int, height: int, size: int, augment: bool, patch_scale: Optional[float] = None
               ) -> tuple[int, int]:
    """Height and width an image is cached at: ``size x size`` for resize-only data; for
    augmented data, the aspect ratio kept and the shorter side ``2 * size`` (never enlarged),
    so a random crop still has pixels to spare. ``patch_scale`` (``data.patches``): the
    original size times that factor, the aspect ratio kept, enlarged only as far as a
    ``size x size`` patch needs."""
    if patch_scale is not None:
        scale = max(float(patch_scale), size / min(width, height))
        return max(size, round(height * scale)), max(size, round(width * scale))
    if not augment:
        return size, size
    short = min(width, height)
    scale = min(1.0, CACHE_FACTOR * size / short)
    return max(size, round(height * scale)), max(size, round(width * scale))


def random_patch(height: int, width: int, size: int, g: torch.Generator) -> tuple[int, int]:
    """``(top, left)`` of a ``size x size`` patch at a uniformly random place, drawn from ``g``."""
    top = int(torch.randint(0, height - size + 1, (1,), generator=g))
    left = int(torch.randint(0, width - size + 1, (1,), generator=g))
    return top, left


def patch_place(mask: torch.Tensor, size: int, g: torch.Generator, fg_fraction: float = 0.0) -> tuple[int, int]:
    """``(top, left)`` of a ``size x size`` patch of ``mask`` (H, W): with probability ``fg_fraction``
    one that contains a foreground pixel (a label other than 0 and 255, drawn uniformly, at a
    uniformly random place inside the patch), else :func:`random_patch`.

    Foreground oversampling (``data.fg_patches``, nnU-Net's ``oversample_foreground_percent``):
    vessels cover a tenth of a fundus photograph and nothing of its black surround, so many
    uniform patches hold no vessel at all; a few-shot support batch of them teaches the model
    to predict background. ``fg_fraction=0`` draws exactly what :func:`random_patch` draws.
    """
    h, w = mask.shape[-2:]
    if fg_fraction > 0 and float(torch.rand(1, generator=g)) < fg_fraction:
        fg = ((mask > 0) & (mask != IGNORE)).nonzero()
        if len(fg):
            y, x = (int(v) for v in fg[int(torch.randint(0, len(fg), (1,), generator=g))])
            dy, dx = (int(v) for v in torch.randint(0, size, (2,), generator=g))
            return min(max(y - dy, 0), h - size), min(max(x - dx, 0), w - size)
    return random_patch(h, w, size, g)


def _range(aug: Any, key: str) -> Optional[list[float]]:
    """``data.augment.KEY`` as ``[low, high]`` with ``0 < low <= high``, or None (the option is off)."""
    value = aug.get(key)
    if value is None:
        return None
    try:
        pair = [float(v) for v in value]
    except (TypeError, ValueError):
        pair = []
    if len(pair) != 2 or not 0 < pair[0] <= pair[1]:
        raise ConfigError(f"data.augment.{key}={value} must be [low, high] with 0 < low <= high (null: off)")
    return pair


def _check_sites(aug: Any, patch: Optional[bool]) -> None:
    """The imaging-site options; ``patch``: whether the transform cuts patches (None: unknown)."""
    zoom = _range(aug, "zoom")
    if zoom is not None and patch is False:
        raise ConfigError(f"data.augment.zoom={zoom} rescales the patches of data.patches=true; without patches "
                          f"data.augment.scale and ratio set the scale: set data.augment.zoom=null (or data.patches=true)")
    _range(aug, "gamma")
    for key in ("blur", "grayscale"):
        if not 0 <= aug.get(key, 0.0) <= 1:
            raise ConfigError(f"data.augment.{key}={aug.get(key)} is a probability: use a value in [0, 1]")
    if aug.get("blur", 0.0) > 0 and _range(aug, "blur_sigma") is None:
        raise ConfigError("data.augment.blur_sigma=null, but data.augment.blur > 0 needs it: set "
                          "data.augment.blur_sigma=[low, high] (pixels, e.g. [0.1, 2.0])")
    _range(aug, "blur_sigma")
    if not 0 <= aug.get("hue", 0.0) <= 0.5:
        raise ConfigError(f"data.augment.hue={aug.get('hue')} is a hue shift in turns: use a value in [0, 0.5]")
    if not 0 <= aug.get("noise", 0.0) <= 1:
        raise ConfigError(f"data.augment.noise={aug.get('noise')} is the largest noise std on [0, 1] images: "
                          f"use a value in [0, 1]")


def check_augment(aug: Any, patch: Optional[bool] = None) -> None:
    """Every ``data.augment`` key, each problem a one-line ConfigError naming the key and the fix.
    ``patch``: whether the data are patches (``data.patches``); None skips the zoom/patches check."""
    scale, ratio = list(aug.scale), list(aug.ratio)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"data.augment.scale={scale} must be [low, high] with 0 < low <= high <= 1")
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
        raise ConfigError(f"data.augment.ratio={ratio} must be [low, high] with 0 < low <= high")
    for key in ("hflip", "vflip"):
        if not 0 <= aug[key] <= 1:
            raise ConfigError(f"data.augment.{key}={aug[key]} is a probability: use a value in [0, 1]")
    if not 0 <= aug.jitter < 1:
        raise ConfigError(f"data.augment.jitter={aug.jitter} must be in [0, 1)")
    _check_sites(aug, patch)


def log_uniform(low: float, high: float, g: torch.Generator) -> float:
    """A factor log-uniform in ``[low, high]``: a magnification and a shrinkage by the same
    ratio (zoom 2 and 0.5, gamma 2 and 0.5) are equally likely."""
    u = float(torch.rand(1, generator=g))
    return math.exp(math.log(low) + (math.log(high) - math.log(low)) * u)


def blur_kernel(sigma: float, height: int, width: int) -> int:
    """Odd Gaussian kernel size ``2 * ceil(3 sigma) + 1`` (the kernel holds 99.7% of the weight),
    shrunk to the largest odd size whose reflect padding the image still allows."""
    k = 2 * math.ceil(3 * sigma) + 1
    limit = 2 * min(height, width) - 1
    return max(1, min(k, limit))


def zoom_side(size: int, zoom: float, height: int, width: int) -> int:
    """Side of the square cut for a ``size x size`` patch at magnification ``zoom``: ``size / zoom``
    rounded, within the image (and at least one pixel)."""
    return max(1, min(round(size / zoom), height, width))


def crop_box(height: int, width: int, scale, ratio, g: torch.Generator) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop covering ``scale`` of the area at an aspect ratio in
    ``ratio`` (log-uniform); v2.RandomResizedCrop's rule, drawn from ``g``. Falls back to the
    largest centred crop within ``ratio`` after 10 tries."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * float(torch.rand(1, generator=g)))
        aspect = math.exp(log_lo + (log_hi - log_lo) * float(torch.rand(1, generator=g)))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            left = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class JointTransform:
    """``(image (3, H, W) uint8 or float, mask (H, W)) -> (float (3, size, size) in [0, 1], int64 mask)``.

    Without augmentation: a resize to ``size x size``. With it: random-resized crop, flips and
    colour jitter (brightness, contrast, saturation factors in ``[1 - jitter, 1 + jitter]``).
    ``patch`` (``data.patches``): a ``size x size`` crop at the cached scale instead (centred
    without augmentation, at a random place with it, then flips and jitter); ``data.augment.zoom``
    cuts a larger or smaller square there and resizes it to ``size``. Then the imaging-site
    photometric ops on the image alone (:meth:`_sites`). The v2 functional ops are applied to
    the ``Image``/``Mask`` pair with parameters drawn from this transform's own generator.
    """

    def __init__(self, size: int, aug: Optional[Any] = None, *, seed: int = 0, name: str = "", patch: bool = False,
                 fg_fraction: float = 0.0):
        self.size = int(size)
        self.patch = bool(patch)  # data.patches: crop size x size pixels, never resize
        self.fg_fraction = float(fg_fraction)  # data.fg_patches: share of training crops placed on foreground
        self.aug = aug if aug is not None and bool(aug.enabled) else None
        self.random = self.aug is not None
        if self.aug is not None:
            check_augment(self.aug, self.patch)
        self.generator = torch.Generator().manual_seed(
            (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % 2**63)

    def _coin(self, p: float) -> bool:
        return p > 0 and float(torch.rand(1, generator=self.generator)) < p

    def _factor(self, strength: float) -> float:
        return 1 + strength * (2 * float(torch.rand(1, generator=self.generator)) - 1)

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand(1, generator=self.generator))

    def _patch(self, img, msk):
        """The ``size x size`` patch: centred without augmentation; else at a place from
        :func:`patch_place`, cut as a square of side ``size / zoom`` when ``data.augment.zoom``
        is set and resized to ``size`` (image bilinear, antialiased; mask nearest), so the model
        sees vessels at the widths other sites' resolutions give them."""
        h, w = img.shape[-2:]
        if self.aug is None:  # the centre patch: a deterministic sample of the image
            top, left = (h - self.size) // 2, (w - self.size) // 2
            return F.crop(img, top, left, self.size, self.size), F.crop(msk, top, left, self.size, self.size)
        zoom = self.aug.get("zoom")
        side = self.size if zoom is None else zoom_side(self.size, log_uniform(*zoom, self.generator), h, w)
        top, left = patch_place(msk, side, self.generator, self.fg_fraction)
        if side == self.size:
            return F.crop(img, top, left, side, side), F.crop(msk, top, left, side, side)
        out = [self.size, self.size]
        return (F.resized_crop(img, top, left, side, side, out, antialias=True),
                F.resized_crop(msk, top, left, side, side, out))  # masks: nearest, 255 stays 255

    def _sites(self, img: torch.Tensor) -> torch.Tensor:
        """The photometric differences between imaging sites, on the float [0, 1] image only,
        after the geometric ops: camera colour (hue, grayscale), tone curve (gamma), optics
        (blur), then sensor noise, which no lens blurs. An option that is off draws nothing."""
        a = self.aug
        hue = float(a.get("hue", 0.0))
        if hue:
            img = F.adjust_hue(img, self._uniform(-hue, hue))
        if self._coin(float(a.get("grayscale", 0.0))):
            img = F.rgb_to_grayscale(img, num_output_channels=3)
        if a.get("gamma") is not None:
            img = F.adjust_gamma(img, log_uniform(*a.gamma, self.generator))
        if self._coin(float(a.get("blur", 0.0))):
            sigma = self._uniform(*a.blur_sigma)
            k = blur_kernel(sigma, *img.shape[-2:])
            img = F.gaussian_blur(img, [k, k], [sigma, sigma])
        noise = float(a.get("noise", 0.0))
        if noise:
            std = self._uniform(0.0, noise)
            img = (img + std * torch.randn(img.shape, generator=self.generator)).clamp_(0, 1)
        return img

    def _flip_jitter(self, img, msk):
        a = self.aug
        if self._coin(a.hflip):
            img, msk = F.horizontal_flip(img), F.horizontal_flip(msk)
        if self._coin(a.vflip):
            img, msk = F.vertical_flip(img), F.vertical_flip(msk)
        if a.jitter:
            img = F.adjust_brightness(img, self._factor(a.jitter))
            img = F.adjust_contrast(img, self._factor(a.jitter))
            img = F.adjust_saturation(img, self._factor(a.jitter))
        return img, msk

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img, msk = tv_tensors.Image(image), tv_tensors.Mask(mask)
        out = [self.size, self.size]
        if self.patch:
            img, msk = self._patch(img, msk)
            if self.aug is not None:
                img, msk = self._flip_jitter(img, msk)
        elif self.aug is None:
            if tuple(img.shape[-2:]) != (self.size, self.size):
                img = F.resize(img, out, antialias=True)
                msk = F.resize(msk, out)  # masks: nearest
        else:
            a = self.aug
            top, left, h, w = crop_box(img.shape[-2], img.shape[-1], a.scale, a.ratio, self.generator)
            img = F.resized_crop(img, top, left, h, w, out, antialias=True)
            msk = F.resized_crop(msk, top, left, h, w, out)  # masks: nearest, 255 stays 255
            img, msk = self._flip_jitter(img, msk)
        img = img.as_subclass(torch.Tensor)
        if img.dtype == torch.uint8:
            img = img.float().div_(255)
        if self.aug is not None:
            img = self._sites(img)
        return img.contiguous(), msk.as_subclass(torch.Tensor).long()
