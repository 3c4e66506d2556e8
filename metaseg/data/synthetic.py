"""The embedded default: a generated multi-domain segmentation mix that needs no files.

Every domain shares one label space, ``background`` plus three shape classes (``disk``,
``square``, ``triangle``). A class is defined by geometry alone: inside one image all shapes
share one fill, so colour never tells the classes apart. Domains differ in appearance only
(palette, background texture, noise, blur, contrast polarity, illumination), which is what
makes the mix a meta-learning problem: features tuned to the training domains' look transfer
poorly to a held-out look, while the shape rule stays learnable from a few labelled images.

Images are a pure function of ``(seed, domain, index)`` through numpy's ``SeedSequence``,
so any image can be regenerated anywhere, in any order, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from metaseg.data.view import SegmentationDataset

CLASSES = ("background", "disk", "square", "triangle")


@dataclass(frozen=True)
class DomainStyle:
    """Appearance of one synthetic domain; the shape-to-class rule never changes."""

    hue: float  # base hue of the palette, in [0, 1)
    polarity: int  # +1: shapes brighter than background; -1: darker
    texture: str  # background texture: flat | stripes | checker | blobs
    texture_freq: float  # cycles per image
    noise: float  # std of additive Gaussian noise
    blur: float  # Gaussian blur sigma in pixels (0 = none)
    contrast: float  # fill-vs-background brightness gap
    illumination: float  # strength of a linear lighting gradient


# Six hand-picked styles spanning the appearance factors; the default mix meta-trains on
# 0-3 and holds out 4 and 5, whose looks (inverted polarity with a blob texture; faint,
# blurred, unevenly lit) no training domain has.
STYLES: tuple[DomainStyle, ...] = (
    DomainStyle(0.00, +1, "flat", 0.0, 0.03, 0.0, 0.55, 0.0),
    DomainStyle(0.60, -1, "stripes", 6.0, 0.05, 0.0, 0.45, 0.1),
    DomainStyle(0.30, +1, "checker", 4.0, 0.08, 0.8, 0.40, 0.2),
    DomainStyle(0.85, -1, "flat", 0.0, 0.12, 0.5, 0.50, 0.3),
    DomainStyle(0.45, -1, "blobs", 3.0, 0.06, 0.0, 0.40, 0.1),
    DomainStyle(0.15, +1, "stripes", 10.0, 0.10, 1.2, 0.25, 0.5),
)


def domain_style(domain: int) -> DomainStyle:
    """The style of ``domain``: hand-picked for 0-5, drawn from the domain id beyond that."""
    if domain < 0:
        raise ValueError(f"synthetic domain must be >= 0, got {domain}")
    if domain < len(STYLES):
        return STYLES[domain]
    rng = np.random.default_rng([0x5EED, domain])
    return DomainStyle(
        hue=float(rng.random()),
        polarity=int(rng.choice([-1, 1])),
        texture=str(rng.choice(["flat", "stripes", "checker", "blobs"])),
        texture_freq=float(rng.uniform(2, 10)),
        noise=float(rng.uniform(0.02, 0.12)),
        blur=float(rng.choice([0.0, 0.6, 1.2])),
        contrast=float(rng.uniform(0.25, 0.55)),
        illumination=float(rng.uniform(0.0, 0.5)),
    )


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def _texture(style: DomainStyle, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray):
    phase = rng.uniform(0, 2 * np.pi)
    f = style.texture_freq * 2 * np.pi
    if style.texture == "stripes":
        angle = rng.uniform(0, np.pi)
        return 0.5 + 0.5 * np.sin(f * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
    if style.texture == "checker":
        return ((np.floor(style.texture_freq * xx + phase) + np.floor(style.texture_freq * yy)) % 2)
    if style.texture == "blobs":
        t = np.zeros_like(xx)
        for _ in range(4):
            cy, cx = rng.uniform(0, 1, 2)
            t += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) * (style.texture_freq * 4) ** 2 / 4)
        return np.clip(t, 0, 1)
    return np.zeros_like(xx)


def _shape_mask(kind: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray):
    """Boolean mask of one randomly placed shape of class ``kind`` (1 disk, 2 square, 3 triangle)."""
    r = rng.uniform(0.08, 0.17)
    cy, cx = rng.uniform(r, 1 - r, 2)
    dy, dx = yy - cy, xx - cx
    if kind == 1:
        return dy**2 + dx**2 <= r**2
    theta = rng.uniform(0, np.pi / 2)
    u = np.cos(theta) * dx + np.sin(theta) * dy
    v = -np.sin(theta) * dx + np.cos(theta) * dy
    if kind == 2:
        s = r * 0.85
        return (np.abs(u) <= s) & (np.abs(v) <= s)
    # equilateral triangle with circumradius r*1.2: inside all three half-planes
    R = r * 1.2
    inside = np.ones_like(u, dtype=bool)
    for k in range(3):
        a = theta + k * 2 * np.pi / 3
        inside &= (np.cos(a) * dx + np.sin(a) * dy) <= R / 2
    return inside


def render(seed: int, domain: int, index: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Image ``(3, size, size)`` float in [0, 1] and mask ``(size, size)`` int64 of one sample."""
    style = domain_style(domain)
    rng = np.random.default_rng([seed, domain, index])
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")

    mask = np.zeros((size, size), dtype=np.int64)
    for _ in range(rng.integers(2, 5)):
        kind = int(rng.integers(1, len(CLASSES)))
        mask[_shape_mask(kind, rng, yy, xx)] = kind

    hue = (style.hue + rng.normal(0, 0.04)) % 1.0
    base = 0.5 - style.polarity * style.contrast / 2
    fill = np.clip(base + style.polarity * style.contrast * rng.uniform(0.8, 1.2), 0, 1)
    bg_rgb = _hsv_to_rgb(hue, rng.uniform(0.3, 0.7), 1.0) * base
    fg_rgb = _hsv_to_rgb((hue + rng.uniform(0.1, 0.3)) % 1.0, rng.uniform(0.3, 0.7), 1.0) * fill

    tex = _texture(style, rng, yy, xx)[None]
    img = bg_rgb[:, None, None] * (0.75 + 0.5 * tex)
    img = np.where(mask[None] > 0, fg_rgb[:, None, None], img)
    angle = rng.uniform(0, 2 * np.pi)
    img = img * (1 + style.illumination * ((np.cos(angle) * xx + np.sin(angle) * yy) - 0.5))[None]

    image = torch.from_numpy(img.astype(np.float32))
    if style.blur > 0:
        k = 2 * int(np.ceil(2 * style.blur)) + 1
        image = TF.gaussian_blur(image, [k, k], [style.blur, style.blur])
    noise = torch.from_numpy(rng.normal(0, style.noise, image.shape).astype(np.float32))
    return (image + noise).clamp_(0, 1), torch.from_numpy(mask)


class SyntheticDomain(SegmentationDataset):
    """One generated domain of ``num_images`` samples, rendered once and kept in memory."""

    num_classes = len(CLASSES)

    def __init__(self, domain: int, num_images: int, size: int, seed: int = 0):
        self.domain, self.num_images, self.size, self.seed = domain, num_images, size, seed
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        if index not in self._cache:
            self._cache[index] = render(self.seed, self.domain, index, self.size)
        return self._cache[index]


def synthetic_task(domain: int = 1, n: int = 4, size: int = 32, seed: int = 0):
    """A ready (support, query) pair of ``n`` images each from one domain, normalised as the
    default mix does (mean 0.5, std 0.25): a realistic task for numerical checks and scripts,
    where random-label noise would make every gradient ill-conditioned."""
    def batch(indices):
        images, masks = zip(*(render(seed, domain, i, size) for i in indices))
        return (torch.stack(images) - 0.5) / 0.25, torch.stack(masks)
    return batch(range(n)), batch(range(n, 2 * n))
