"""Pixel losses of the inner and outer loops, by the name ``meta.loss`` gives them.

Every loss takes ``(logits, masks)``, skips pixels labelled :data:`metaseg.utils.masks.IGNORE`
and is twice differentiable, since second-order MAML differentiates the inner gradient again.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from metaseg.utils.errors import ConfigError
from metaseg.utils.masks import IGNORE

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def pixel_cross_entropy(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Pixel-wise cross-entropy, mean over labelled pixels; 255 marks pixels to ignore."""
    return F.cross_entropy(logits, masks, ignore_index=IGNORE)


def ce_dice(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus soft Dice loss of the classes after background, over the batch.

    Cross-entropy alone lets a rare, thin class (vessels: a tenth of a fundus patch) lose to
    the background prior in a few steps; the Dice term weighs the class by its own overlap.
    Pixels labelled 255 count in neither term; a class absent from batch and prediction adds
    ~0 (the smoothing term), so a background-only batch is not punished. Twice differentiable.
    """
    valid = (masks != IGNORE).unsqueeze(1)
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=1)[:, 1:] * valid
    onehot = F.one_hot(masks.clamp(max=logits.shape[1] - 1), logits.shape[1]).movedim(-1, 1)[:, 1:] * valid
    dims = (0, 2, 3)
    inter, total = (probs * onehot).sum(dims), probs.sum(dims) + onehot.sum(dims)
    dice = 1 - (2 * inter + 1) / (total + 1)
    return pixel_cross_entropy(logits, masks) + dice.mean()


LOSSES: dict[str, LossFn] = {"ce": pixel_cross_entropy, "ce_dice": ce_dice}


def loss_fn(m: Any) -> LossFn:
    """``meta.loss`` as a function of (logits, masks)."""
    name = m.get("loss", "ce")
    if name not in LOSSES:
        raise ConfigError(f"meta.loss={name!r} is not one of {', '.join(LOSSES)}")
    return LOSSES[name]
