"""The one way a checkpoint (or none) becomes a model, its label space and how it sees images.

``metaseg-eval``, ``metaseg-predict`` and the random-init baseline start from the same thing,
a :class:`Source`, so a checkpoint means the same model, classes, normalisation and
adaptation defaults in all three:

* **a checkpoint**: the model, its mean/std, size and adaptation defaults (alpha, K, the
  algorithm, Meta-SGD's learned step sizes) come from the checkpoint's own config. The data
  read beside it (held-out datasets, or a support folder) is normalised with the checkpoint's
  statistics; when its classes differ from the checkpoint's, the body is kept under a new head,
  set per episode from the support prototypes (``engine/heads.py``);
* **none** (``checkpoint=none``): the ``model`` group at a seeded random initialisation on the
  data's label space, adapted with the ``meta`` group's defaults (the schema's, if none), the
  very model ``eval.baseline`` draws beside a trained one (:func:`random_init`).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf, open_dict
from torch import nn

from metaseg.config import MetaConfig, TrainConfig
from metaseg.data.mix import Mix, build_mix, normalisation
from metaseg.engine.checkpoint import load_checkpoint
from metaseg.engine.heads import NewHeadLearner, load_body
from metaseg.meta.from_config import make_learner
from metaseg.meta.precision import Precision
from metaseg.models.factory import build_model
from metaseg.models.weights import fill_normalisation
from metaseg.utils.errors import CheckpointError, ConfigError
from metaseg.utils.runtime import seed_everything

log = logging.getLogger(__name__)
NO_CHECKPOINT = "none"
NEW_HEAD_INIT = "support prototypes (Proto-MAML)"


@dataclass
class Source:
    """A model to adapt and everything that says how it sees images (the module docstring)."""

    model: nn.Module
    model_cfg: Any
    meta_cfg: Any  # the adaptation defaults: algorithm, alpha, K
    classes: list[str]
    head: dict  # the record of eval.json / predict.json: {"kind", "checkpoint_classes", "init"}
    size: int  # the side images are read at
    mean: list[float]
    std: list[float]
    mix: Optional[Mix] = None  # the held-out datasets ``data`` names (None: no data, zero-shot prediction)
    data_cfg: Optional[Any] = None  # that data as read: the checkpoint's mean/std (and size, when 0)
    step: Optional[int] = None
    checkpoint: dict = field(default_factory=dict)  # the loaded checkpoint ({} for checkpoint=none)
    train_cfg: Optional[Any] = None  # its config merged into the schema (None for checkpoint=none)

    @property
    def meta_state(self) -> Optional[dict]:
        """What the checkpoint's algorithm learned besides theta (Meta-SGD's step sizes), if anything."""
        return self.checkpoint.get("meta_state")

    @property
    def train_data(self) -> Any:
        """The data the model was trained on (its validation tasks tune ``eval.tune``): the checkpoint's mix,
        or for ``checkpoint=none`` the data given."""
        return self.train_cfg.data if self.train_cfg is not None else self.data_cfg


def is_baseline(checkpoint: Any) -> bool:
    """``checkpoint=none``: a random-init model instead of a checkpoint."""
    return str(checkpoint).strip().lower() == NO_CHECKPOINT


def head_record(kind: str, checkpoint_classes: Optional[Sequence[str]] = None) -> dict:
    """Where the model's head comes from: ``checkpoint`` (its own), ``new`` (body kept, head from the support
    prototypes) or ``random`` (``checkpoint=none``)."""
    return {"kind": kind, "checkpoint_classes": None if checkpoint_classes is None else list(checkpoint_classes),
            "init": NEW_HEAD_INIT if kind == "new" else None}


def random_init(model_cfg: Any, num_classes: int, seed: int) -> nn.Module:
    """The ``model`` config's network as ``seed`` draws it: ``checkpoint=none``'s model and the baseline's."""
    seed_everything(seed)
    return build_model(model_cfg, num_classes)


def heldout_data(data_cfg: Any, trained: Any) -> Any:
    """The data to read: ``data_cfg`` (the checkpoint's own mix when null), normalised with the
    checkpoint's mean/std (the statistics its model was trained with) and, where ``data.size`` is
    0 (``data=folder``), at the checkpoint's size."""
    if data_cfg is None:
        return trained
    data_cfg = copy.deepcopy(data_cfg)
    with open_dict(data_cfg):
        if not data_cfg.size:
            data_cfg.size = trained.size
        mean, std = normalisation(trained)  # a run records what it used; null only in hand-made configs
        if data_cfg.mean is not None and (list(data_cfg.mean) != mean or list(data_cfg.std or []) != std):
            log.info("normalising with the checkpoint's data.mean=%s data.std=%s", mean, std)
        data_cfg.mean, data_cfg.std = mean, std
    return data_cfg


def heldout_mix(data_cfg: Any) -> Mix:
    """The held-out datasets ``data_cfg`` names, built and checked."""
    if not data_cfg.heldout:
        raise ConfigError("no held-out dataset to evaluate: set data.heldout=[NAME,...]")
    return build_mix(data_cfg, need_train=False)


def read_checkpoint(path: Any) -> tuple[dict, Any]:
    """The checkpoint at ``path`` and its config merged into the training schema."""
    ckpt = load_checkpoint(path)
    try:
        train_cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), ckpt["config"])
    except Exception as exc:  # noqa: BLE001 - schema mismatch of an older/newer checkpoint
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint={path!r}: its config does not fit this metaseg: {first}") from exc
    missing = sorted(OmegaConf.missing_keys(train_cfg))  # what the schema cannot default: data, model, ...
    if missing:
        raise CheckpointError(f"checkpoint={path!r} has an incomplete config (no {', '.join(missing[:6])}), so its "
                              f"model cannot be rebuilt; use a checkpoint written by metaseg-train "
                              f"(<run dir>/checkpoints/last.pt or best.pt)")
    return ckpt, train_cfg


def state_dict_problem(exc: BaseException, limit: int = 240) -> str:
    """The first detail of torch's ``load_state_dict`` error (its first line only names the model)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)
    return detail if len(detail) <= limit else detail[: limit - 3] + "..."


def checkpoint_model(ckpt: dict, train_cfg: Any, classes: Sequence[str], path: str) -> tuple[nn.Module, dict]:
    """The checkpoint's model for the label space ``classes``, and its :func:`head_record`.

    Classes other than the checkpoint's keep its body and get a new head, initialised per
    episode from the support prototypes (``engine/heads.py``)."""
    trained = list(ckpt.get("classes") or train_cfg.data.classes)
    new_head = list(classes) != trained
    model = build_model(train_cfg.model, len(classes) if new_head else len(trained))
    if new_head:
        load_body(model, ckpt["model"], path)
        log.info("held-out classes %s differ from the checkpoint's %s: new head, initialised from each "
                 "episode's support prototypes, then adapted", list(classes), trained)
    else:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint={path!r}: weights do not fit its model config: "
                                  f"{state_dict_problem(exc)}") from exc
    return model, head_record("new" if new_head else "checkpoint", trained)


def check_baseline(data_cfg: Any, model_cfg: Any) -> None:
    """What ``checkpoint=none`` needs: the data (its label space and size) and a model to initialise.

    ``data.mean``/``std`` left null are filled in ``data_cfg`` as training fills them (the named
    encoder weights' statistics, else 0.5/0.25), so the baseline sees images as a trained model would."""
    if data_cfg is None:
        raise ConfigError("checkpoint=none needs the data to evaluate: add data=NAME (e.g. data=synthetic)")
    if model_cfg is None:
        raise ConfigError("checkpoint=none needs a model to initialise: add model=NAME (e.g. model=unet_resnet18)")
    if not data_cfg.size:
        raise ConfigError("checkpoint=none has no checkpoint to take the image size from: set data.size=N")
    fill_normalisation(data_cfg, model_cfg)
    if len(data_cfg.mean) != model_cfg.in_channels:
        raise ConfigError(f"data.mean has {len(data_cfg.mean)} values but model.in_channels={model_cfg.in_channels}")


def load(checkpoint: Optional[str], data: Optional[Any], *, own_data: bool = False, data_root: Optional[str] = None,
         model: Optional[Any] = None, meta: Optional[Any] = None, seed: int = 0) -> Source:
    """The :class:`Source` of ``checkpoint`` (None: ``checkpoint=none``) and of the held-out ``data`` read beside it.

    With a checkpoint and ``data`` null: its own mix with ``own_data`` (``metaseg-eval``; ``data_root``
    moves that mix to another folder), else no data at all (zero-shot prediction, the checkpoint's
    classes). ``checkpoint=none`` needs ``data`` and ``model``; ``meta`` (null: the schema's) and
    ``seed`` set its adaptation defaults and its draw.
    """
    if checkpoint is None:
        check_baseline(data, model)
        mix = heldout_mix(data)
        return Source(random_init(model, mix.num_classes, seed), model,
                      meta if meta is not None else OmegaConf.structured(MetaConfig), list(mix.classes),
                      head_record("random"), int(data.size), list(data.mean), list(data.std), mix, data)
    ckpt, train_cfg = read_checkpoint(checkpoint)
    trained = train_cfg.data
    if data is not None:
        if data_root:
            raise ConfigError(f"data_root={data_root} moves the checkpoint's own mix, but data= names another "
                              f"one: set its data.root instead")
        data = heldout_data(data, trained)
    elif own_data or data_root:
        if data_root:  # the checkpoint's datasets, found under another folder (another machine)
            with open_dict(train_cfg):
                trained.root = str(data_root)
        data = trained
    mix = heldout_mix(data) if data is not None else None
    classes = list(mix.classes) if mix is not None else list(ckpt.get("classes") or trained.classes)
    net, head = checkpoint_model(ckpt, train_cfg, classes, str(checkpoint))
    mean, std = normalisation(trained)
    size = int(data.size if data is not None else trained.size)  # images are read at the size adapted at
    return Source(net, train_cfg.model, train_cfg.meta, classes, head, size, mean, std, mix, data, ckpt.get("step"),
                  ckpt, train_cfg)


def adaptation_learner(model: nn.Module, meta_cfg: Any, precision: Precision, head: dict,
                       meta_state: Optional[dict] = None):
    """The learner that adapts ``model`` as ``meta_cfg`` says, with the checkpoint's learned state
    (Meta-SGD's step sizes, if any); a new head starts from the support prototypes."""
    learner = make_learner(model, meta_cfg, precision)
    learner.load_meta_state_dict(meta_state)
    return NewHeadLearner(learner) if head["kind"] == "new" else learner
