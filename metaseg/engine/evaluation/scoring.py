"""Predictions for scoring: whole samples at the training size, or a sliding window at full resolution.

``resize`` mode runs the model on the dataset's own samples (``dataset[i]``, the size the model
was trained and adapted at), a batch of images per forward pass.

``slide`` mode scores against the original mask: for every image, ``dataset.full_resolution(i)``
(a dataset rendered at the training size gives its ordinary sample) is covered by windows of the training
size at a given stride, the logits of overlapping windows are averaged, and the argmax is taken
at the original resolution. As in mmsegmentation's ``slide_inference``, the last window of a
row or column is shifted back to end at the image border, and an image smaller than the window
is zero-padded at the bottom/right (zero is the dataset mean after normalisation) and the
padding cropped off the logits. Windows of consecutive images share forward batches of
``batch_size`` windows, so an image exactly one window large is predicted as in ``resize``.

Everything runs under ``torch.inference_mode``: scoring builds no graph.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metaseg.data.tasks import collate
from metaseg.data.view import SegmentationDataset

MODES = ("resize", "slide")


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows covering ``[0, length)``; the last one ends at the border."""
    if length <= window:
        return [0]
    count = math.ceil((length - window) / stride) + 1
    return sorted({min(i * stride, length - window) for i in range(count)})


@dataclass
class _Pending:
    """One image in flight through the sliding window: summed logits and window counts."""

    index: int
    image: torch.Tensor  # (C, Hp, Wp), padded
    mask: torch.Tensor
    height: int
    width: int
    left: int  # windows not yet predicted
    logits: Optional[torch.Tensor] = None
    count: Optional[torch.Tensor] = None


def _autocast(precision):
    return precision.autocast() if precision is not None else contextlib.nullcontext()


def slide(model, items: Iterator, window, stride, batch_size: int, precision):
    """Yield ``(index, logits (K, H, W), mask)`` per image of ``items`` = ``(index, image, mask)``, in order."""
    wh, ww = window
    sh, sw = stride
    queue: list[tuple[_Pending, int, int]] = []
    inflight: list[_Pending] = []

    def run() -> None:
        crops = torch.stack([p.image[:, y : y + wh, x : x + ww] for p, y, x in queue])
        with _autocast(precision):
            out = model(crops)
        out = out.float()
        for (p, y, x), logits in zip(queue, out):
            if p.logits is None:
                p.logits = torch.zeros(logits.shape[0], *p.image.shape[-2:], device=logits.device)
                p.count = torch.zeros(1, *p.image.shape[-2:], device=logits.device)
            p.logits[:, y : y + wh, x : x + ww] += logits
            p.count[:, y : y + wh, x : x + ww] += 1
            p.left -= 1
        queue.clear()

    def finished():
        while inflight and inflight[0].left == 0:
            p = inflight.pop(0)
            yield p.index, (p.logits / p.count)[:, : p.height, : p.width], p.mask

    for index, image, mask in items:
        h, w = image.shape[-2:]
        padded = F.pad(image, (0, max(ww - w, 0), 0, max(wh - h, 0)))
        ys = window_starts(padded.shape[-2], wh, sh)
        xs = window_starts(padded.shape[-1], ww, sw)
        pending = _Pending(index, padded, mask, h, w, len(ys) * len(xs))
        inflight.append(pending)
        for y in ys:
            for x in xs:
                queue.append((pending, y, x))
                if len(queue) == batch_size:
                    run()
                    yield from finished()
    if queue:
        run()
    yield from finished()


def predictions(model: nn.Module, dataset: SegmentationDataset, indices: Sequence[int], device: torch.device,
                batch_size: int, precision=None, *, mode: str = "resize",
                window: Optional[Sequence[int]] = None, stride: Optional[Sequence[int]] = None,
                ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Yield ``(indices, predicted labels (B, H, W), masks (B, H, W))`` on ``device``.

    Call under ``torch.inference_mode``. ``resize``: batches of ``batch_size`` samples.
    ``slide``: one image per item, at its full resolution; ``window`` (h, w) and ``stride``
    (h, w) are required.
    """
    if mode == "resize":
        for start in range(0, len(indices), batch_size):
            chunk = [int(i) for i in indices[start : start + batch_size]]
            images, masks = collate(dataset, chunk)
            with _autocast(precision):
                logits = model(images.to(device))
            yield chunk, logits.argmax(1), masks.to(device)
        return
    if mode != "slide":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if window is None or stride is None:
        raise ValueError("slide mode needs window and stride")

    def items():
        for i in indices:
            image, mask = dataset.full_resolution(int(i))
            yield int(i), image.to(device), mask.to(device)

    for index, logits, mask in slide(model, items(), window, stride, batch_size, precision):
        yield [index], logits.argmax(0, keepdim=True), mask.unsqueeze(0)
