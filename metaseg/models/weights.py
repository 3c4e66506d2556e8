"""Encoder weights: a name smp knows (fetched through smp's own cache) or a local state-dict file.

Three decisions live here rather than in the callers:

* A weight name (``imagenet``, ``ssl``, ...) is checked against smp's own encoder registry
  (``smp.encoders.encoders[encoder]["pretrained_settings"]``), so every name the installed smp
  knows works and none is copied here. smp itself fetches and loads them (``encoder_weights``
  of ``smp.create_model``: ``huggingface_hub.hf_hub_download`` into the Hugging Face cache, the
  first conv patched for ``in_channels`` other than 3); metaseg only turns the failure of a
  machine without network and without cache into one line naming both ways out.
* A local file is read with ``weights_only=True`` (no code in it runs) and must fit the
  encoder: by default a file with a tensor of another shape, a tensor the encoder lacks, or
  one missing is refused with the first such key named, because a partial fit (a ResNet-34
  file on a ResNet-18) would otherwise train from a silently half-random encoder.
  ``model.strict_weights: false`` loads the tensors that fit and logs the rest.
* Named weights carry the normalisation they were trained with (smp's preprocessing
  parameters); ``input_normalisation`` hands it to the data when ``data.mean``/``std`` are
  null, and an explicit ``data.mean``/``std`` always wins.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
from typing import Any, Iterator, Optional

import segmentation_models_pytorch as smp
import torch
from torch import nn

from metaseg.config import DEFAULT_MEAN, DEFAULT_STD
from metaseg.utils.errors import ConfigError

log = logging.getLogger(__name__)
KEY = "model.encoder_weights"
TIMM_NAME = "imagenet"  # tu- encoders: the pretrained tag is part of the encoder name; this name asks for it
RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")
PATH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".safetensors")
SAVE_HINT = "torch.save(model.encoder.state_dict(), 'encoder.pth')"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(exc: BaseException) -> str:
    """The first non-empty line of ``exc``'s message without terminal escapes, else its type's name."""
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


# --- local files -------------------------------------------------------------------------------

def read_torch_file(path: str, key: str = KEY) -> Any:
    """What ``path`` holds, read as plain torch data (``weights_only``), or one line saying why not.

    A file that pickles Python objects is refused without torch's advice to retry with
    ``weights_only=False``: for exactly that file the advice is how code would get run.
    """
    if os.path.getsize(path) == 0:
        raise ConfigError(f"{key}={path!r} is empty (0 bytes): save the weights into it again ({SAVE_HINT})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every unreadable file gets one line
        text = _ANSI.sub("", str(exc))
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            raise ConfigError(f"{key}={path!r} holds pickled Python objects ({found.group(1)}), which metaseg "
                              f"refuses to load since loading them could run code: pass a file of plain tensors "
                              f"({SAVE_HINT})") from exc
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)  # never torch's advice above it
        if detail:
            why = f"not a file torch.save wrote ({detail.group(1).strip()})"
        else:
            why = "not plain tensors" if "weights only load failed" in text.lower() else one_line(exc)
        raise ConfigError(f"{key}={path!r} cannot be read as plain torch data: {why}") from exc


def as_state_dict(obj: Any, path: str, key: str = KEY) -> dict[str, torch.Tensor]:
    """``obj`` as a state dict (names to tensors; a ``{"state_dict": ...}`` wrapper is opened)."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConfigError(f"{key}={path!r} holds a {type(obj).__name__}, not a state dict (tensor names to "
                          f"tensors): save the encoder's ({SAVE_HINT})")
    if not obj:
        raise ConfigError(f"{key}={path!r} holds an empty dict, not the encoder's tensors ({SAVE_HINT})")
    bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ConfigError(f"{key}={path!r} is not a state dict: its entry {bad!r} is a {type(obj[bad]).__name__}, "
                          f"not a tensor; save the encoder's tensors alone ({SAVE_HINT})")
    return obj


def _running_stat(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in RUNNING_STATS


def _in_dropped_module(module: nn.Module, name: str) -> bool:
    """``name`` belongs to a submodule replaced by ``nn.Identity`` (a stage the forward never reaches)."""
    parts = name.split(".")[:-1]
    for i in range(1, len(parts) + 1):
        try:
            sub = module.get_submodule(".".join(parts[:i]))
        except AttributeError:
            return False
        if isinstance(sub, nn.Identity):
            return True
    return False


def _as_smp_passes_it(encoder: nn.Module, state: dict) -> dict:
    """``state`` as the encoder's own ``load_state_dict`` hands it to torch.

    smp's encoders drop their classification head (``fc.*``, ``classifier.*``, ...) and some
    rename old keys before loading; running that code on a throwaway copy of the encoder
    applies smp's rules without copying them here."""
    probe = dict(state)
    with contextlib.suppress(Exception):  # the copy may refuse the rest; only its edits to probe count
        copy.deepcopy(encoder).load_state_dict(probe)
    return dict(probe)


def fit_report(module: nn.Module, state: dict) -> dict[str, list[str]]:
    """How ``state`` fits ``module``: matched, missing, unexpected, wrong (shape) and skipped keys.

    Running statistics count on neither side (``model.norm: batch`` removes them); tensors of
    stages the model never runs (cut by ``encoder_depth``) are skipped, not unexpected."""
    own = module.state_dict()
    report: dict[str, list[str]] = {"matched": [], "missing": [], "unexpected": [], "wrong": [], "skipped": []}
    for name, tensor in state.items():
        if name in own:
            report["matched" if tuple(tensor.shape) == tuple(own[name].shape) else "wrong"].append(name)
        elif _running_stat(name) or _in_dropped_module(module, name):
            report["skipped"].append(name)
        else:
            report["unexpected"].append(name)
    report["missing"] = [n for n in own if n not in state and not _running_stat(n)]
    return report


def _first_problem(report: dict, state: dict, own: dict) -> str:
    if report["wrong"]:
        name = report["wrong"][0]
        return (f"first of another shape {name!r}: file {list(state[name].shape)}, "
                f"model {list(own[name].shape)}")
    if report["unexpected"]:
        return f"first unexpected {report['unexpected'][0]!r}"
    return f"first missing {report['missing'][0]!r}"


def load_encoder_state(model: nn.Module, state: dict, path: str, key: str = KEY, strict: bool = True) -> dict:
    """Load ``state`` into ``model.encoder`` if it fits (see the module docstring); returns the counts."""
    encoder = model.encoder
    state = _as_smp_passes_it(encoder, state)
    own = encoder.state_dict()
    report = fit_report(encoder, state)
    counts = {k: len(v) for k, v in report.items()}
    where = f"the {type(encoder).__name__} of model.encoder"
    if not report["matched"] and not report["wrong"]:
        raise ConfigError(f"{key}={path!r} has no tensor whose name matches {where} (expected keys such as "
                          f"{next(iter(own))!r}); is it the state dict of this encoder? ({SAVE_HINT})")
    bad = report["wrong"] or report["unexpected"] or report["missing"]
    if bad and (strict or not report["matched"]):
        raise ConfigError(f"{key}={path!r} does not fit {where}: {counts['wrong']} of another shape, "
                          f"{counts['unexpected']} unexpected, {counts['missing']} missing "
                          f"({_first_problem(report, state, own)}); pass the state dict of this encoder "
                          f"({SAVE_HINT})" + (f", or model.strict_weights=false to load the {counts['matched']} "
                                              f"that fit" if report["matched"] else ""))
    nn.Module.load_state_dict(encoder, {k: state[k] for k in report["matched"]}, strict=False)
    (log.warning if bad else log.info)(
        "%s: %d encoder tensors loaded from %s, %d missing (random init), %d unexpected and %d of another shape "
        "(not loaded), %d skipped (running statistics, stages not run)", key, counts["matched"], path,
        counts["missing"], counts["unexpected"], counts["wrong"], counts["skipped"])
    return counts


def load_encoder_weights(model: nn.Module, path: str, key: str = KEY, strict: bool = True) -> dict:
    """Load the local state-dict file ``path`` into ``model.encoder``; returns the counts of the fit."""
    if not os.path.isfile(path):
        raise ConfigError(f"{key}={path!r} is not a file: pass a local state dict of the encoder ({SAVE_HINT}), "
                          f"a weight name smp knows, or {key}=null for random init")
    return load_encoder_state(model, as_state_dict(read_torch_file(path, key), path, key), path, key, strict)


# --- names smp knows ---------------------------------------------------------------------------

def _timm_universal(encoder: str) -> bool:
    renamed = getattr(smp.encoders, "is_equivalent_to_timm_universal", lambda name: False)  # timm- -> tu- (smp 0.5+)
    return encoder.startswith("tu-") or renamed(encoder)


def weight_names(encoder: str) -> Optional[list[str]]:
    """The weight names smp knows for ``encoder``; None when smp does not know the encoder."""
    if _timm_universal(encoder):
        return [TIMM_NAME]
    entry = smp.encoders.encoders.get(encoder)
    return list(entry["pretrained_settings"]) if entry else None


def _looks_like_path(value: str) -> bool:
    return "/" in value or os.sep in value or value.startswith(("~", ".")) or value.lower().endswith(PATH_SUFFIXES)


def hub_name(model_cfg: Any) -> Optional[str]:
    """``model.encoder_weights`` when it names weights smp knows for the encoder; None for null or a file.

    A value that is neither a known name nor a file fails here, before anything is built."""
    value = model_cfg.encoder_weights
    if value is None:
        return None
    value = str(value)
    names = weight_names(model_cfg.encoder)
    if names is None or value in names:  # an unknown encoder: smp.create_model names the problem
        return value
    if os.path.isfile(os.path.expanduser(value)):
        return None
    if _looks_like_path(value):
        raise ConfigError(f"{KEY}={value!r} is not a file: pass a local state dict of the encoder ({SAVE_HINT}), "
                          f"a weight name smp knows for {model_cfg.encoder} ({', '.join(names) or 'none'}), "
                          f"or {KEY}=null for random init")
    known = f"it knows {', '.join(names)}" if names else "it knows none for this encoder"
    raise ConfigError(f"{KEY}={value!r} is not a weight name smp knows for model.encoder={model_cfg.encoder!r} "
                      f"({known}): pass one of those, a local state-dict file, or {KEY}=null for random init")


def smp_weights(encoder: str, name: str) -> Any:
    """The ``encoder_weights`` value smp takes for ``name`` (``tu-`` encoders take True)."""
    return True if _timm_universal(encoder) else name


def _cache_dir() -> str:
    from huggingface_hub import constants
    return str(constants.HF_HUB_CACHE)


def offline_message(encoder: str, name: str) -> str:
    """The one line for named weights that are neither cached nor reachable: both ways out."""
    from huggingface_hub import constants
    why = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "no connection to the Hugging Face hub"
    fetch = (f"python -c \"import segmentation_models_pytorch as smp; "
             f"smp.encoders.get_encoder('{encoder}', weights={smp_weights(encoder, name)!r})\"")
    return (f"{KEY}={name!r}: the {encoder} weights are not in the Hugging Face cache ({_cache_dir()}) and cannot "
            f"be fetched ({why}): run {fetch} once on a machine with internet and copy its Hugging Face cache "
            f"(~/.cache/huggingface/hub unless HF_HOME or HF_HUB_CACHE say otherwise) to {_cache_dir()}, "
            f"or pass {KEY}=/path/to/encoder.pth (a local state dict of the encoder)")


@contextlib.contextmanager
def through_hub(encoder: str, name: str) -> Iterator[None]:
    """Run smp's download of ``encoder``'s ``name`` weights; a failure becomes one line.

    The hub's own retry warnings are held back so that offline the user reads one line."""
    from urllib.error import URLError

    from huggingface_hub import errors

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        yield
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, ConnectionError, TimeoutError,
            URLError) as exc:
        raise ConfigError(offline_message(encoder, name)) from exc
    except errors.HfHubHTTPError as exc:
        raise ConfigError(f"{KEY}={name!r}: the Hugging Face hub refused the {encoder} weights: {one_line(exc)}"
                          ) from exc
    finally:
        hub_log.setLevel(level)


def announce(encoder: str, name: str) -> None:
    log.info("%s=%s: the %s weights through smp (Hugging Face cache %s; fetched on first use)", KEY, name, encoder,
             _cache_dir())


# --- normalisation -----------------------------------------------------------------------------

def for_channels(values: list[float], channels: int) -> list[float]:
    """Per-channel statistics of 3-channel weights for ``channels`` inputs, as smp maps the first conv:
    1 channel sums the RGB filters (the mean of the statistics), more cycle through R, G, B."""
    if channels == 1:
        return [sum(values) / len(values)]
    return [values[i % len(values)] for i in range(channels)]


def weights_normalisation(model_cfg: Any) -> Optional[tuple[list[float], list[float]]]:
    """mean/std (for images in [0, 1]) the named weights were trained with: smp's preprocessing
    parameters for the encoder, mapped to ``model.in_channels``; None without named weights."""
    name = hub_name(model_cfg)
    encoder = model_cfg.encoder
    if name is None or weight_names(encoder) is None:  # no names, or an encoder build_model will refuse
        return None
    try:
        with through_hub(encoder, name):
            params = smp.encoders.get_preprocessing_params(encoder, pretrained=name)
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"{KEY}={name!r}: smp records no normalisation for the {encoder} weights ({one_line(exc)}); "
                          f"set data.mean=[...] and data.std=[...]") from exc
    scale = float(params.get("input_range", [0, 1])[1]) or 1.0  # [0, 255] weights: the same statistics / 255
    if params.get("input_space", "RGB") != "RGB":
        log.warning("%s=%s: %s expects %s input; metaseg feeds RGB", KEY, name, encoder, params["input_space"])
    channels = int(model_cfg.in_channels)
    return (for_channels([m / scale for m in params["mean"]], channels),
            for_channels([s / scale for s in params["std"]], channels))


def input_normalisation(data_cfg: Any, model_cfg: Any) -> tuple[list[float], list[float], str]:
    """(mean, std, where from): ``data.mean``/``std`` when set, else the named encoder weights'
    statistics, else 0.5/0.25 per channel."""
    mean, std = getattr(data_cfg, "mean", None), getattr(data_cfg, "std", None)
    if mean is not None and std is not None:
        return list(mean), list(std), "data.mean/std"
    if (mean is None) != (std is None):
        raise ConfigError(f"data.mean={mean} and data.std={std}: set both, or neither (null: the statistics of "
                          f"the named encoder weights, else {DEFAULT_MEAN}/{DEFAULT_STD})")
    stats = weights_normalisation(model_cfg)
    if stats is not None:
        return stats[0], stats[1], f"the {model_cfg.encoder_weights} weights of {model_cfg.encoder} (smp)"
    channels = int(model_cfg.in_channels)
    return [DEFAULT_MEAN] * channels, [DEFAULT_STD] * channels, "the default (no named encoder weights)"


def fill_normalisation(data_cfg: Any, model_cfg: Any) -> bool:
    """Write the resolved ``data.mean``/``std`` into ``data_cfg`` where they are null; True if it did."""
    if getattr(data_cfg, "mean", None) is not None and getattr(data_cfg, "std", None) is not None:
        return False
    mean, std, source = input_normalisation(data_cfg, model_cfg)
    data_cfg.mean, data_cfg.std = mean, std
    log.info("data.mean=%s data.std=%s: %s", [round(m, 4) for m in mean], [round(s, 4) for s in std], source)
    return True
