"""``meta.init_from``: start meta-training from weights someone (or an earlier stage) already trained.

Plain MAML from random weights is rarely the strongest recipe: joint training (``meta=erm``)
first, then meta-training from its weights, usually beats it. ``meta.init_from=PATH`` accepts

* any metaseg checkpoint (``checkpoints/last.pt`` or ``best.pt`` of any algorithm): the whole
  model is loaded; when the checkpoint's label space differs from the mix's, every tensor but
  the segmentation head's is loaded and the head keeps its fresh random init;
* a local encoder-weights file (a state dict of ``model.encoder``, like
  ``model.encoder_weights``): only the encoder is loaded, under the same rules (it must fit the
  encoder unless ``strict`` is off; the counts of what was loaded are logged).

Anything else (a tensor, a list, pickled code, weights of other shapes) stops with one line
naming the file and the first key that does not fit.

Only the weights come across: optimizer, sampler and step start fresh (that is what
``trainer.resume`` is for). The weights are loaded before a resume, so a resumed run still
continues from its own checkpoint.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

from torch import nn

from metaseg.engine.checkpoint import load_checkpoint
from metaseg.engine.heads import HEAD
from metaseg.models.weights import as_state_dict, load_encoder_state, read_torch_file
from metaseg.utils.errors import ConfigError

log = logging.getLogger(__name__)
KEY = "meta.init_from"


def is_metaseg_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and "model" in obj and "config" in obj


def initialise(model: nn.Module, path: str, classes: Sequence[str], key: str = KEY, strict: bool = True) -> dict:
    """Load ``path``'s weights into ``model`` (see the module docstring); returns what was loaded.

    ``strict=False`` (``model.strict_weights``) lets an encoder file load the tensors that fit."""
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise ConfigError(f"{key}={path!r} is not a file; name a metaseg checkpoint (<run>/checkpoints/last.pt) "
                          f"or a local encoder state dict, or {key}=null for the model's own init")
    obj = read_torch_file(path, key)
    if not is_metaseg_checkpoint(obj):
        if not isinstance(obj, dict):
            raise ConfigError(f"{key}={path!r} holds a {type(obj).__name__}, neither a metaseg checkpoint "
                              f"(<run>/checkpoints/last.pt) nor a state dict of the encoder "
                              f"(torch.save(model.encoder.state_dict(), 'encoder.pth'))")
        counts = load_encoder_state(model, as_state_dict(obj, path, key), path, key, strict)
        return {"kind": "encoder", "path": path, **counts}
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
        if wrong:
            first = (f"first of another shape {wrong[0]!r}: checkpoint {list(state[wrong[0]].shape)}, "
                     f"model {list(own[wrong[0]].shape)}")
        else:
            first = f"first {'missing' if missing else 'unexpected'} {(missing or unexpected)[0]!r}"
        raise ConfigError(f"{key}={path!r}: its weights do not fit model={model.__class__.__name__} "
                          f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} of another shape, "
                          f"{first}); train with the checkpoint's model settings")
    model.load_state_dict(state, strict=same_head)
    algorithm = ((ckpt.get("config") or {}).get("meta") or {}).get("algorithm")
    log.info("%s: %s weights of %s (step %s)%s", key, algorithm, path, ckpt.get("step"),
             "" if same_head else f"; its classes {ckpt_classes} differ: body only, new head")
    return {"kind": "checkpoint" if same_head else "checkpoint body", "path": path, "step": ckpt.get("step"),
            "algorithm": algorithm}
