"""``meta.init_from``: start meta-training from weights someone (or an earlier stage) already trained.

Plain MAML from random weights is rarely the strongest recipe: joint training (``meta=erm``)
first, then meta-training from its weights, usually beats it. ``meta.init_from=PATH`` accepts

* any metaseg checkpoint (``checkpoints/last.pt`` or ``best.pt`` of any algorithm): the whole
  model is loaded; when the checkpoint's label space differs from the mix's, every tensor but
  the segmentation head's is loaded and the head keeps its fresh random init;
* a local encoder-weights file (a state dict of ``model.encoder``, like
  ``model.encoder_weights``): only the encoder is loaded.

Only the weights come across: optimizer, sampler and step start fresh (that is what
``trainer.resume`` is for). The weights are loaded before a resume, so a resumed run still
continues from its own checkpoint.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import torch
from torch import nn

from metaseg.engine.checkpoint import load_checkpoint
from metaseg.engine.heads import HEAD
from metaseg.models.factory import load_encoder_weights
from metaseg.utils.errors import ConfigError

log = logging.getLogger(__name__)
KEY = "meta.init_from"


def is_metaseg_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and "model" in obj and "config" in obj


def initialise(model: nn.Module, path: str, classes: Sequence[str], key: str = KEY) -> dict:
    """Load ``path``'s weights into ``model`` (see the module docstring); returns what was loaded."""
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise ConfigError(f"{key}={path!r} is not a file; name a metaseg checkpoint (<run>/checkpoints/last.pt) "
                          f"or a local encoder state dict, or {key}=null for the model's own init")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same message
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{key}={path!r} cannot be read as plain torch data: {first}") from exc
    if not is_metaseg_checkpoint(obj):
        load_encoder_weights(model, path, key=key)
        log.info("%s: encoder weights from %s", key, path)
        return {"kind": "encoder", "path": path}
    ckpt = load_checkpoint(path)  # format and version checks
    state = ckpt["model"]
    ckpt_classes = list(ckpt.get("classes") or [])
    same_head = not ckpt_classes or ckpt_classes == list(classes)
    if not same_head:
        state = {k: v for k, v in state.items() if not k.startswith(HEAD)}
    own = model.state_dict()
    missing = [k for k in own if k not in state and (same_head or not k.startswith(HEAD))]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise ConfigError(f"{key}={path!r}: its weights do not fit model={model.__class__.__name__} "
                          f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} of another shape, "
                          f"first {first!r}); train with the checkpoint's model settings")
    model.load_state_dict(state, strict=same_head)
    algorithm = ((ckpt.get("config") or {}).get("meta") or {}).get("algorithm")
    log.info("%s: %s weights of %s (step %s)%s", key, algorithm, path, ckpt.get("step"),
             "" if same_head else f"; its classes {ckpt_classes} differ: body only, new head")
    return {"kind": "checkpoint" if same_head else "checkpoint body", "path": path, "step": ckpt.get("step"),
            "algorithm": algorithm}
