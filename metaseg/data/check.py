"""``metaseg-data``'s engine: build a dataset or mix as training would, summarise it, draw samples.

Building runs every check training runs (files paired, sizes equal, masks single-channel and
within the declared mapping, held-out datasets not trained on), so a config that passes here
starts training. The summary gives, per dataset: its role, image count per split, original
sizes, and the share of labelled pixels of each class (at the working resolution) with the
ignored share; the grid shows ``samples`` images per dataset with their masks overlaid
(classes in colour, ``background`` left clear, ignore in white), to catch masks that are
shifted, inverted or mapped to the wrong class by eye.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import open_dict
from PIL import Image, ImageDraw
from torchvision.utils import draw_segmentation_masks, make_grid

from metaseg.data.mix import Mix, build_mix, normalisation, train_names
from metaseg.data.view import SegmentationDataset
from metaseg.utils.errors import ConfigError, DataError
from metaseg.utils.masks import IGNORE
from metaseg.utils.runtime import atomic_write, write_json

log = logging.getLogger(__name__)
DEFAULT_SIZE = 64
CELL = 128  # grid cell side in pixels
MAX_GRID_ROWS = 16
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (128, 0, 0), (170, 255, 195), (128, 128, 0), (0, 0, 128), (128, 128, 128)]


def _data_cfg(data_cfg: Any) -> Any:
    data_cfg = copy.deepcopy(data_cfg)
    if not data_cfg.size:  # data=folder: 0 means "the checkpoint's"; there is none here
        with open_dict(data_cfg):
            data_cfg.size = DEFAULT_SIZE
    return data_cfg


def dataset_summary(ds: SegmentationDataset, classes: list[str]) -> dict:
    info = ds.info()
    counts = np.asarray(ds.pixel_counts).sum(0).astype(np.float64)
    total = counts.sum()
    info["pixels"] = {c: float(counts[i] / total) if total else 0.0 for i, c in enumerate(classes)}
    info["pixels"]["ignore"] = float(counts[-1] / total) if total else 0.0
    return info


def summarize(mix: Mix) -> dict:
    out = {"classes": mix.classes, "task": mix.task, "datasets": {}}
    for role, group in (("train", mix.train), ("heldout", mix.heldout)):
        for name, ds in group.items():
            out["datasets"][name] = {"role": role, "parent": mix.parents.get(name, name),
                                     **dataset_summary(ds, mix.classes)}
    for name, w in zip(mix.train, mix.weights):
        out["datasets"][name]["weight"] = w
    return out


def format_summary(name: str, size: int, summary: dict) -> str:
    classes = summary["classes"]
    lines = [f"mix {name!r}: {len(classes)} classes {classes}, size {size}, task {summary['task']}"]
    head = f"{'dataset':<28} {'role':<8} {'images':>6}  {'splits':<24} {'size WxH (min-max)':<20} pixels"
    lines.append(head)
    for ds_name, d in summary["datasets"].items():
        splits = ", ".join(f"{k} {v}" for k, v in d.get("splits", {"all": d["images"]}).items())
        if "size_min" in d:
            lo, hi = d["size_min"], d["size_max"]
            sizes = f"{lo[0]}x{lo[1]}" + ("" if lo == hi else f"-{hi[0]}x{hi[1]}")
        else:
            sizes = f"{size}x{size}"
        pix = " ".join(f"{c} {v:.3f}" for c, v in d["pixels"].items() if v > 0 or c != "ignore")
        lines.append(f"{ds_name:<28} {d['role']:<8} {d['images']:>6}  {splits:<24} {sizes:<20} {pix}")
    return "\n".join(lines)


def overlay(image: torch.Tensor, mask: torch.Tensor, classes: list[str], mean, std) -> torch.Tensor:
    """uint8 (3, CELL, CELL): the de-normalised image with its mask drawn over it."""
    img = image * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    img = F.interpolate(img[None].clamp(0, 1), size=(CELL, CELL), mode="bilinear", antialias=True)[0]
    msk = F.interpolate(mask[None, None].float(), size=(CELL, CELL), mode="nearest")[0, 0].long()
    img = (img * 255).round().to(torch.uint8)
    layers, colors = [], []
    for cid, cname in enumerate(classes):
        if cname != "background":
            layers.append(msk == cid)
            colors.append(PALETTE[cid % len(PALETTE)])
    layers.append(msk == IGNORE)
    colors.append((255, 255, 255))
    return draw_segmentation_masks(img, torch.stack(layers), alpha=0.45, colors=colors)


def sample_grid(mix: Mix, samples: int, mean, std) -> tuple[Image.Image, list[str]]:
    rows, names = [], []
    for name, ds in list({**mix.train, **mix.heldout}.items())[:MAX_GRID_ROWS]:
        idx = np.linspace(0, len(ds) - 1, min(samples, len(ds))).round().astype(int)
        cells = []
        for i in idx:
            image, mask = ds.full_resolution(int(i))
            cells.append(overlay(image, mask, mix.classes, mean, std))
        cells += [torch.zeros(3, CELL, CELL, dtype=torch.uint8)] * (samples - len(cells))
        rows.extend(cells)
        names.append(name)
    grid = make_grid(torch.stack(rows), nrow=samples, padding=2, pad_value=32)
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(picture)
    for r, name in enumerate(names):
        y = 2 + r * (CELL + 2)
        draw.rectangle([2, y, 2 + 6 * len(name) + 4, y + 12], fill=(0, 0, 0))
        draw.text((4, y), name, fill=(255, 255, 255))
    return picture, names


def inspect_data(cfg: Any, run_dir: str | Path) -> dict:
    """Build ``cfg.data`` with every check, print and save its summary, write the sample grid."""
    run_dir = Path(run_dir)
    data_cfg = _data_cfg(cfg.data)
    if cfg.samples < 1:
        raise ConfigError(f"samples={cfg.samples} must be >= 1")
    mix = build_mix(data_cfg, need_train=bool(train_names(data_cfg)))
    if not mix.train and not mix.heldout:
        raise ConfigError("the mix names no dataset: set data.train or data.heldout")
    summary = summarize(mix)
    need = cfg.get("task_images")
    if need:
        small = {n: d["images"] for n, d in summary["datasets"].items() if d["images"] < need}
        if small:
            raise DataError(f"{len(small)} dataset(s) have fewer images than task_images={need} "
                            f"(shots + query): {small}; lower meta.shots/meta.query or add images")
    summary["name"] = data_cfg.name
    summary["size"] = int(data_cfg.size)
    print(format_summary(data_cfg.name, int(data_cfg.size), summary))
    picture, _ = sample_grid(mix, int(cfg.samples), *normalisation(data_cfg))
    grid_path = run_dir / cfg.grid
    atomic_write(grid_path, lambda tmp: picture.save(tmp, format="PNG"))
    summary["grid"] = str(grid_path)
    write_json(run_dir / "summary.json", summary)
    print(f"wrote {grid_path} and {run_dir / 'summary.json'}")
    return summary
