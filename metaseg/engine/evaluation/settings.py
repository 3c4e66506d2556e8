"""The ``eval`` block as one typed value, checked once where a command (or a test) hands it over.

OmegaConf cannot say "an int or a list of ints" or "distinct step counts", so ``eval.shots`` and
``eval.curve_steps`` arrive as whatever was typed. :func:`validate_eval` reads them once into an
:class:`EvalSettings` (shots as a tuple of ints, the curve's steps sorted, the k it follows
resolved) and stops with one line naming the key on anything else; the protocol, tuning,
validation and the baseline take that value and trust it. What differs between the held-out
protocol and its uses (validation tasks, a tuned adaptation, the baseline without figures) is
a derived value (:meth:`EvalSettings.for_validation`, ...), never a flag written into a config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from omegaconf import ListConfig

from metaseg.config import EvalConfig
from metaseg.engine.evaluation.scoring import MODES
from metaseg.utils.errors import ConfigError

TUNE_METRICS = ("miou", "mf1", "fg_dice", "fg_iou")
_DEFAULTS = EvalConfig()
_LISTS = (list, tuple, ListConfig)


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@dataclass(frozen=True)
class EvalSettings:
    """A checked ``EvalConfig`` (field meanings: ``metaseg.config.EvalConfig``).

    ``shots`` are the k of the episodes in the given order (the first fills eval.json's top-level
    ``adapted``); ``curve_steps`` the adaptation curve's step counts, increasing (empty: no curve);
    ``curve_shots`` the k whose episodes the curve follows (empty without a curve).
    """

    shots: tuple[int, ...] = (5,)
    episodes: int = 10
    adapt_steps: Optional[int] = None
    adapt_lr: Optional[float] = None
    batch_size: int = 16
    max_images: Optional[int] = None
    mode: str = "resize"  # one of metaseg.engine.evaluation.scoring.MODES
    window: Optional[int] = None
    stride: Optional[int] = None
    pictures: int = 4
    support_patches: int = 8
    val_episodes: Optional[int] = None
    curve_steps: tuple[int, ...] = ()
    curve_shots: tuple[int, ...] = ()
    tune: bool = False
    tune_lrs: tuple[float, ...] = tuple(_DEFAULTS.tune_lrs)
    tune_steps: tuple[int, ...] = tuple(_DEFAULTS.tune_steps)
    tune_episodes: Optional[int] = None
    tune_metric: str = "miou"
    tune_datasets: Optional[tuple[str, ...]] = None
    baseline: bool = True

    @property
    def episode_shots(self) -> tuple[int, ...]:
        """The k that get episodes: none with ``eval.episodes=0``."""
        return self.shots if self.episodes >= 1 else ()

    def tune_grid(self) -> list[tuple[float, int]]:
        """``(adapt_lr, adapt_steps)`` points in the order they are tried: steps outer, lrs inner."""
        lrs, steps = list(self.tune_lrs), list(self.tune_steps)
        if not lrs or not steps:
            raise ConfigError(f"eval.tune needs eval.tune_lrs and eval.tune_steps to list values, got {lrs} and "
                              f"{steps}")
        if any(not float(lr) > 0 for lr in lrs):
            raise ConfigError(f"eval.tune_lrs={lrs} must all be > 0")
        if any(int(s) < 0 for s in steps):
            raise ConfigError(f"eval.tune_steps={steps} must all be >= 0")
        return [(float(lr), int(s)) for s in steps for lr in lrs]

    def with_adaptation(self, adapt_lr: Optional[float], adapt_steps: int) -> EvalSettings:
        """These settings adapting at ``adapt_lr`` (None: the learner's learned step sizes) for ``adapt_steps``."""
        return dataclasses.replace(self, adapt_lr=None if adapt_lr is None else float(adapt_lr),
                                   adapt_steps=int(adapt_steps))

    def without_curve(self) -> EvalSettings:
        """No adaptation curve: evaluations that pick ``best.pt`` or tune, not the final figure."""
        return dataclasses.replace(self, curve_steps=(), curve_shots=())

    def without_figures(self) -> EvalSettings:
        """No pictures and no curve, every number-fixing setting as it is (the random-init baseline)."""
        return dataclasses.replace(self.without_curve(), pictures=0)

    def for_validation(self, *, adapt_lr: Optional[float] = None, adapt_steps: Optional[int] = None,
                       episodes: Optional[int] = None, shots: Optional[int | Sequence[int]] = None) -> EvalSettings:
        """The settings validation tasks are scored with: no figures, ``resize`` mode (a patch dataset is
        switched to ``slide`` by the protocol), ``eval.val_episodes`` episodes (null: ``eval.episodes``),
        the first k of ``eval.shots`` (the one ``best.pt`` and ``eval.tune`` read; a small training
        site need not keep images for the held-out protocol's largest k), optional overrides."""
        if episodes is None:
            episodes = self.val_episodes if self.val_episodes is not None else self.episodes
        if shots is None:
            ks = self.shots[:1]
        else:
            ks = (shots,) if isinstance(shots, int) else tuple(shots)
        out = dataclasses.replace(self.without_figures(), mode="resize", episodes=int(episodes), shots=ks)
        if adapt_lr is not None:
            out = dataclasses.replace(out, adapt_lr=float(adapt_lr))
        if adapt_steps is not None:
            out = dataclasses.replace(out, adapt_steps=int(adapt_steps))
        return out


def _shots(cfg: Any) -> tuple[int, ...]:
    """``eval.shots`` as a tuple: ``5`` -> ``(5,)``, ``[1, 5, 10]`` as is, ``0`` or ``[]`` -> none."""
    shots = cfg.get("shots", _DEFAULTS.shots)
    if isinstance(shots, _LISTS):
        values = list(shots)
        if not all(_is_int(k, 1) for k in values):
            raise ConfigError(f"eval.shots={values} must list integers >= 1, e.g. eval.shots=[1,5,10]")
        if len(set(values)) != len(values):
            raise ConfigError(f"eval.shots={values} names a k twice; list each k once")
        return tuple(values)
    if _is_int(shots, 0):
        return (shots,) if shots else ()
    raise ConfigError(f"eval.shots={shots!r} must be an integer >= 0 or a list of them, e.g. eval.shots=[1,5,10]")


def _curve_steps(cfg: Any) -> tuple[int, ...]:
    """``eval.curve_steps`` in increasing order; ``()``: none."""
    steps = cfg.get("curve_steps")
    if steps is None:
        return ()
    if not isinstance(steps, _LISTS):
        raise ConfigError(f"eval.curve_steps={steps!r} must be a list of step counts >= 0, "
                          f"e.g. eval.curve_steps=[0,1,3,10,30,100]")
    values = list(steps)
    if not all(_is_int(t, 0) for t in values):
        raise ConfigError(f"eval.curve_steps={values} must list integers >= 0, e.g. eval.curve_steps=[0,1,3,10,30,100]")
    if len(set(values)) != len(values):
        raise ConfigError(f"eval.curve_steps={values} names a step count twice; list each once")
    return tuple(sorted(values))


def _curve_shots(cfg: Any, ks: tuple[int, ...]) -> tuple[int, ...]:
    """``eval.curve_shots``: the k whose episodes the curve follows (null: every k of ``eval.shots``).

    A curve to 100 steps costs 100 adaptation steps per (k, episode); on a CPU a study can afford
    the step curve at its headline k only and read the other k from the protocol's own table."""
    chosen = cfg.get("curve_shots")
    if chosen is None:
        return ks
    values = list(chosen) if isinstance(chosen, _LISTS) else [chosen]
    stray = [k for k in values if k not in ks]
    if stray:
        raise ConfigError(f"eval.curve_shots={values} names k={stray} that eval.shots={list(ks)} does not run: list k "
                          f"of eval.shots, or eval.curve_shots=null for all of them")
    return tuple(k for k in ks if k in values)


def _optional_tuple(value: Any) -> Optional[tuple]:
    return None if value is None else tuple(value)


def validate_eval(cfg: Any) -> EvalSettings:
    """``cfg`` (an ``EvalConfig``, a dict-like config built by hand, or settings already checked)
    as :class:`EvalSettings`; anything the schema cannot express stops here, one line naming the key.

    Read with ``get`` and the schema's defaults, so a config built by hand (an older run's) fails
    with the key's name, not deep inside the episode loop."""
    if isinstance(cfg, EvalSettings):
        return cfg

    def get(key: str) -> Any:
        return cfg.get(key, getattr(_DEFAULTS, key))

    ks = _shots(cfg)
    steps = _curve_steps(cfg)
    traced = _curve_shots(cfg, ks) if steps else ()
    episodes = get("episodes")
    if steps and (not ks or episodes < 1):
        raise ConfigError(f"eval.curve_steps={list(steps)} needs few-shot episodes, but eval.shots={get('shots')} and "
                          f"eval.episodes={episodes}: set eval.shots=[1,5,10] and eval.episodes>=1, "
                          f"or eval.curve_steps=[]")
    for key, low in (("episodes", 0), ("batch_size", 1), ("pictures", 0)):
        if get(key) < low:
            raise ConfigError(f"eval.{key}={get(key)} must be >= {low}")
    for key, low in (("max_images", 1), ("window", 8), ("stride", 1), ("adapt_steps", 0), ("val_episodes", 0)):
        value = get(key)
        if value is not None and value < low:
            raise ConfigError(f"eval.{key}={value} must be >= {low} (or null)")
    adapt_lr = get("adapt_lr")
    if adapt_lr is not None and not adapt_lr > 0:
        raise ConfigError(f"eval.adapt_lr={adapt_lr} must be > 0 (or null: the meta config's inner_lr)")
    if get("mode") not in MODES:
        raise ConfigError(f"eval.mode={get('mode')!r} is not one of {', '.join(MODES)}")
    metric = str(get("tune_metric"))
    if metric not in TUNE_METRICS:
        raise ConfigError(f"eval.tune_metric={metric!r} is not one of {', '.join(TUNE_METRICS)}")
    settings = EvalSettings(
        shots=ks, episodes=episodes, adapt_steps=get("adapt_steps"), adapt_lr=adapt_lr,
        batch_size=get("batch_size"), max_images=get("max_images"), mode=get("mode"), window=get("window"),
        stride=get("stride"), pictures=get("pictures"), support_patches=int(get("support_patches")),
        val_episodes=get("val_episodes"), curve_steps=steps, curve_shots=traced, tune=bool(get("tune")),
        tune_lrs=tuple(get("tune_lrs")), tune_steps=tuple(get("tune_steps")), tune_episodes=get("tune_episodes"),
        tune_metric=metric, tune_datasets=_optional_tuple(get("tune_datasets")), baseline=bool(get("baseline")))
    if settings.tune:
        settings.tune_grid()
    return settings
