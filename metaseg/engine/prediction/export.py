"""The adapted model, saved for later: a metaseg checkpoint and a plain segmentation-models-pytorch folder.

* ``adapted.pt``: a metaseg checkpoint (plain data, ``load_checkpoint``) with the adapted
  weights, the label space they predict, the training config with ``data`` replaced by the
  support data as used (size, mean/std of the checkpoint), what was adapted on, and whatever
  algorithm state the source checkpoint carried (``meta_state``: learned step sizes, ...). It
  goes anywhere a checkpoint does: ``metaseg-predict checkpoint=adapted.pt`` segments with it
  zero-shot, ``metaseg-eval checkpoint=adapted.pt data=folder data.root=DIR`` scores it.
* ``adapted_smp/``: smp's own ``save_pretrained`` folder (``config.json``,
  ``model.safetensors``, a model card), which ``smp.from_pretrained(dir)`` loads without
  metaseg. metaseg's models differ from the ones smp builds in two ways, handled here:

  - **Unused encoder stages** (an encoder cut at ``encoder_depth: 3``) are ``nn.Identity`` in
    metaseg; smp builds them, so the folder holds them as zeros. The forward pass never
    reaches them, so they change no prediction (they do take disk space).
  - **BatchNorm running statistics** do not exist in metaseg (``model.norm: batch``:
    every batch is normalised by its own statistics, MAML's convention); smp's BatchNorm
    keeps running statistics and uses them in ``eval()`` mode. The folder's running
    statistics are estimated on the images the model adapted on (zero-shot: the first batch
    segmented), so ``model.eval()`` in plain smp predicts sensibly but not exactly as
    metaseg does. For metaseg's exact predictions, switch BatchNorm to batch statistics
    after loading (``batch_statistics`` below, three lines of plain PyTorch).

  A ``model.norm: group`` model has GroupNorm where smp builds BatchNorm, so no smp folder
  can reproduce it: only ``adapted.pt`` is written, with a warning.

Both are written atomically: the checkpoint by ``save_checkpoint``, the folder in a
temporary sibling renamed into place.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf
from torch import nn

from metaseg.config import TrainConfig, TrainerConfig
from metaseg.engine.checkpoint import save_checkpoint

log = logging.getLogger(__name__)
ADAPTED_CHECKPOINT = "adapted.pt"
ADAPTED_SMP = "adapted_smp"
# Keys of a training checkpoint that only resuming needs; everything else travels to adapted.pt.
TRAINING_ONLY = ("optimizer", "scheduler", "scaler", "sampler", "best", "rng", "format", "version")


def batch_statistics(model: nn.Module) -> nn.Module:
    """Make every BatchNorm of ``model`` normalise by the statistics of the batch it is given, in
    ``eval()`` mode too, as metaseg's models do; in place. The same three lines work without
    metaseg on a model from ``smp.from_pretrained``."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    return model


def adapted_config(train_cfg: Optional[Any], data_cfg: Optional[Any], model_cfg: Any, meta_cfg: Any,
                   seed: int) -> dict:
    """The config stored in ``adapted.pt``: the source's (a fresh one for ``checkpoint=none``) with
    ``data`` replaced by the support data as used; unchanged for zero-shot."""
    if train_cfg is None:
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig),
                              {"model": model_cfg, "meta": meta_cfg, "trainer": OmegaConf.structured(TrainerConfig),
                               "seed": seed})
    else:
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), train_cfg)
    if data_cfg is not None:
        cfg.data = data_cfg
    return OmegaConf.to_container(cfg, resolve=True)


def save_adapted_checkpoint(path: Path, model: nn.Module, *, source: dict, config: dict, classes: list[str],
                            step: Optional[int], record: dict) -> None:
    """``adapted.pt`` (see the module docstring); ``source`` is the loaded source checkpoint ({} for none)."""
    carried = {k: v for k, v in source.items() if k not in TRAINING_ONLY}
    weights = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    save_checkpoint(path, **{**carried, "model": weights, "config": config, "classes": list(classes),
                             "step": step, "adapted": record})


def _plain_smp_model(model: nn.Module) -> nn.Module:
    """The model smp itself builds from ``model``'s init arguments, holding ``model``'s weights."""
    init = {k: v for k, v in model.config.items() if not k.startswith("_")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        plain = type(model)(**init)
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    result = plain.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"smp's {type(model).__name__} has no tensor {result.unexpected_keys[0]!r}")
    params = dict(plain.named_parameters())
    with torch.no_grad():
        for key in result.missing_keys:  # stages metaseg replaced by Identity: never reached
            if key in params:
                params[key].zero_()
    return plain


@torch.no_grad()
def _estimate_running_stats(model: nn.Module, images: torch.Tensor) -> None:
    """Running statistics of every BatchNorm from one pass over ``images`` (a cumulative average)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    model(images)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


def export_smp(model: nn.Module, norm: str, directory: Path, stats_images: torch.Tensor) -> Optional[Path]:
    """``adapted_smp/``: smp's ``save_pretrained`` folder of ``model`` (None when it cannot reproduce it)."""
    if norm != "batch":
        log.warning("model.norm=%s: smp builds BatchNorm layers where this model has GroupNorm, so an smp folder "
                    "would not reproduce its predictions; only %s is written", norm, ADAPTED_CHECKPOINT)
        return None
    if not hasattr(model, "config"):
        log.warning("%s is not an smp model with save_pretrained; only %s is written", type(model).__name__,
                    ADAPTED_CHECKPOINT)
        return None
    plain = _plain_smp_model(model)
    _estimate_running_stats(plain, stats_images.detach().to("cpu", torch.float32))
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    old = None
    try:
        plain.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700
        if directory.exists():  # a folder cannot be renamed onto a full one: move the old one aside first
            old = directory.with_name(f".{directory.name}.old.{os.getpid()}")
            os.replace(directory, old)
        try:
            os.replace(tmp, directory)
        except BaseException:
            if old is not None:
                os.replace(old, directory)
                old = None
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return directory
