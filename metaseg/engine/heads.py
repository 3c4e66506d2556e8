"""A held-out label space of its own: the checkpoint's body under a new head, set from the support set.

When the held-out data's classes differ from the checkpoint's (other names or another number,
say a binary vessel folder for a model meta-trained on four shape classes), ``metaseg-eval``
keeps every weight of the encoder and decoder and builds a new final convolution (smp's
``segmentation_head[0]``) with one output per new class:

* **zero-shot**: the new head is all zeros, so every pixel gets class 0; this score is a floor
  (nothing is known about the new classes before a labelled image is seen), not a claim;
* **few-shot**: in each episode the head starts as the support set's nearest-prototype
  classifier, Proto-MAML's output-layer initialisation (Triantafillou et al., 2020,
  "Meta-Dataset"): with mu_c the mean decoder feature over the support pixels of class c,
  w_c = 2 mu_c and b_c = -||mu_c||^2, so the logit ``||f||^2 - ||f - mu_c||^2`` ranks classes
  by squared distance to their prototype. The inner loop then adapts the whole model, head
  included, on the same support images, with the checkpoint's alpha and K (or
  ``eval.adapt_lr`` / ``eval.adapt_steps``). Classes absent from the support start below
  every present class.

The prototypes are computed in the mode the inner loop runs in (training mode: BatchNorm on
the support batch's statistics), under no gradient; every episode starts from the same body.
Each episode reloads one working copy of the model (made once, with its own inner loop:
``MetaLearner.for_model``) with the body, sets its head and adapts it; the learner's model
is never touched.
"""

from __future__ import annotations

import copy
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from metaseg.meta import MetaLearner
from metaseg.utils.errors import CheckpointError, ConfigError
from metaseg.utils.masks import IGNORE

HEAD = "segmentation_head."


def head_conv(model: nn.Module) -> nn.Conv2d:
    """The final convolution of an smp model (``segmentation_head[0]``)."""
    head = getattr(model, "segmentation_head", None)
    if isinstance(head, nn.Sequential) and len(head) and isinstance(head[0], nn.Conv2d):
        return head[0]
    raise ConfigError(f"{type(model).__name__} has no smp segmentation_head convolution, so no head can be "
                      f"built for a new label space; evaluate on data with the checkpoint's classes")


def load_body(model: nn.Module, state: Mapping[str, torch.Tensor], checkpoint: str) -> None:
    """Load every tensor of ``state`` but the head's into ``model``; zero the head."""
    body = {k: v for k, v in state.items() if not k.startswith(HEAD)}
    missing, unexpected = model.load_state_dict(body, strict=False)
    missing = [k for k in missing if not k.startswith(HEAD)]
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise CheckpointError(f"checkpoint={checkpoint!r}: weights do not fit its model config "
                              f"({len(missing)} missing, {len(unexpected)} unexpected, first {first!r})")
    conv = head_conv(model)
    with torch.no_grad():
        conv.weight.zero_()
        if conv.bias is not None:
            conv.bias.zero_()


@torch.no_grad()
def prototype_head(model: nn.Module, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Set ``model``'s head to the nearest-prototype classifier of ``(images, masks)``; returns the prototypes."""
    conv = head_conv(model)
    captured: list[torch.Tensor] = []
    hook = conv.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].detach()))
    was_training = model.training
    model.train()
    try:
        model(images)
    finally:
        hook.remove()
        model.train(was_training)
    feats = captured[0].float()
    n_cls, dim = conv.out_channels, feats.shape[1]
    labels = F.interpolate(masks[:, None].float(), size=feats.shape[-2:], mode="nearest")[:, 0].long()
    feats = feats.permute(0, 2, 3, 1).reshape(-1, dim)
    labels = labels.reshape(-1)
    keep = (labels != IGNORE) & (labels >= 0) & (labels < n_cls)
    onehot = F.one_hot(labels[keep], n_cls).float()
    counts = onehot.sum(0)
    protos = onehot.T @ feats[keep] / counts.clamp(min=1)[:, None]
    weight = 2 * protos
    bias = -(protos**2).sum(1)
    present = counts > 0
    if present.any() and not present.all():
        logits = feats[keep] @ weight[present].T + bias[present]
        weight[~present] = 0
        bias[~present] = logits.max(1).values.min() - 1.0
    w = torch.zeros_like(conv.weight)
    kh, kw = conv.kernel_size
    w[:, :, kh // 2, kw // 2] = weight.to(w.dtype)
    conv.weight.copy_(w)
    if conv.bias is not None:
        conv.bias.copy_(bias.to(conv.bias.dtype))
    return protos


class NewHeadLearner:
    """A learner whose ``adapt`` first sets the new head from the support set (see the module doc).

    Everything else (``model``, ``precision``, ``inner_steps``, ...) is the wrapped learner's.
    An episode adapts a working copy of the model, made once: the learner's model (its body and
    zero head) is loaded into it, its head set from the support set, and the same algorithm
    around it (``learner.for_model``) adapts it.
    """

    def __init__(self, learner: MetaLearner):
        self._learner = learner
        self._start = copy.deepcopy(learner.model)
        self._episode = learner.for_model(self._start)

    def __getattr__(self, name: str):
        return getattr(self._learner, name)

    def adapt(self, images: torch.Tensor, masks: torch.Tensor, **kwargs):
        self._start.load_state_dict(self._learner.model.state_dict())
        prototype_head(self._start, images, masks)
        return self._episode.adapt(images, masks, **kwargs)
