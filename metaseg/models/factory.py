"""Segmentation models from config: segmentation-models-pytorch, meta-learning ready.

Three decisions live here rather than in the callers:

* Encoder weights are smp's business (``metaseg/models/weights.py``): ``model.encoder_weights``
  is ``null`` (random init), a weight name smp knows for the encoder (``imagenet``, ``ssl``,
  ...), which smp fetches into its cache on first use and patches for ``in_channels``, or a
  local state-dict file, which must fit the encoder.
* BatchNorm runs on batch statistics everywhere (``model.norm: batch``), the convention of
  MAML (Finn et al., 2017): ``track_running_stats`` is off and the running buffers are
  removed. Each task is normalised by its own support or query batch, so no task's
  statistics can leak into the stored model, and there is no state besides the parameters
  for the inner loop to carry. At evaluation, images are normalised by the statistics of
  the batch they are scored in (``eval.batch_size``). ``model.norm: group`` swaps every
  BatchNorm for a GroupNorm, which needs no batch at all.
* ``model.smooth: true`` swaps every ReLU for a SiLU and every max pooling for average
  pooling. Second-order MAML differentiates the inner gradient once more; through ReLUs and
  max pooling that gradient jumps wherever a pre-activation changes sign or a window's
  maximum moves, so the adapted loss agrees with its exact meta-gradient only within ~1e-8 of
  theta, and that gradient is hundreds of times the first-order one and unrelated to it
  (``scripts/probe_meta_gradient.py``, BENCHMARKS.md). The smooth network is differentiable
  twice everywhere.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import nn

from metaseg.models.weights import announce, hub_name, load_encoder_weights, smp_weights, through_hub
from metaseg.utils.errors import ConfigError

NORMS = ("batch", "group")


def _group_norm_for(bn: nn.BatchNorm2d) -> nn.GroupNorm:
    channels = bn.num_features
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, affine=True)


def set_norm(model: nn.Module, norm: str) -> nn.Module:
    """Switch every BatchNorm of ``model`` to the normalisation ``norm`` names, in place."""
    if norm not in NORMS:
        raise ConfigError(f"model.norm={norm!r} is not one of {', '.join(NORMS)}")
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.modules.batchnorm._BatchNorm):
                continue
            if norm == "group":
                setattr(module, child_name, _group_norm_for(child))
            else:
                child.track_running_stats = False
                child.running_mean = None
                child.running_var = None
                child.num_batches_tracked = None
    return model


def make_smooth(model: nn.Module) -> nn.Module:
    """Replace every ReLU by a SiLU and every max pooling by average pooling, in place."""
    for module in list(model.modules()):  # a shared ReLU is replaced under every parent
        for name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.SiLU())
            elif isinstance(child, nn.MaxPool2d):
                setattr(module, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding,
                                                   ceil_mode=child.ceil_mode, count_include_pad=False))
    return model


def drop_unused_modules(model: nn.Module, in_channels: int, size: int = 64) -> list[str]:
    """Replace submodules the forward pass never reaches with ``nn.Identity``; returns their names.

    An encoder cut short (``encoder_depth: 3``) keeps its deeper stages in smp; they would
    otherwise be stored, checkpointed and carried through every inner loop for nothing.
    """
    model.train()
    x = torch.randn(2, in_channels, size, size)
    model.zero_grad(set_to_none=True)
    model(x).float().sum().backward()
    unused = {name for name, p in model.named_parameters() if p.requires_grad and p.grad is None}
    model.zero_grad(set_to_none=True)
    dropped: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(d + ".") for d in dropped):
            continue
        names = [f"{name}.{n}" for n, _ in module.named_parameters()]
        if names and all(n in unused for n in names):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Identity())
            dropped.append(name)
    return dropped


def build_model(cfg: Any, num_classes: int) -> nn.Module:
    """Build the smp model ``cfg`` (a ``ModelConfig``) describes, with ``num_classes`` outputs."""
    extra = dict(cfg.extra or {})
    if "decoder_channels" in extra and extra["decoder_channels"] is not None:
        extra["decoder_channels"] = tuple(extra["decoder_channels"])
    name = hub_name(cfg)  # a weight name smp knows, checked before anything is built; None: none or a file
    if name is not None:
        announce(cfg.encoder, name)
    try:
        with through_hub(cfg.encoder, name) if name else contextlib.nullcontext():
            model = smp.create_model(
                cfg.arch,
                encoder_name=cfg.encoder,
                encoder_weights=None if name is None else smp_weights(cfg.encoder, name),
                in_channels=cfg.in_channels,
                classes=num_classes,
                **extra,
            )
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"model.arch={cfg.arch!r} / model.encoder={cfg.encoder!r} / model.extra={extra}: "
            f"segmentation-models-pytorch refused it: {exc}"
        ) from exc
    # Stages never run go first, so a weights file is matched against the stages that do (a full
    # encoder's file and one saved from this model both fit); the draws do not depend on the order.
    drop_unused_modules(model, cfg.in_channels)
    if cfg.encoder_weights is not None and name is None:
        # Load before changing norms so a file with running stats still matches the encoder.
        load_encoder_weights(model, os.path.expanduser(str(cfg.encoder_weights)),
                             strict=bool(getattr(cfg, "strict_weights", True)))
    set_norm(model, cfg.norm)
    if cfg.smooth:
        make_smooth(model)
    return model
