"""The held-out protocol: zero-shot once, then seeded few-shot episodes for every k, scored on the rest.

For each held-out dataset of n images:

1. **Zero-shot.** theta as it is scores every image (the first ``eval.max_images`` if set).
2. **Episodes.** Episode e draws one permutation of the n images from
   ``numpy.random.default_rng([seed, crc32(dataset name), e])``. For each k of ``eval.shots``
   the support is its first k images (so the 1-shot support of an episode is inside its
   5-shot support) and the query is the rest after the largest k (with ``eval.max_images``,
   the next that many of the permutation, so episodes score different images): every k of an
   episode is scored on the same images, so columns of a table compare like with like. Every (k,
   episode) adapts a fresh copy of theta (``MetaLearner.adapt``; theta is never modified),
   with ``eval.adapt_steps`` / ``eval.adapt_lr`` (default: the checkpoint's K and alpha).
3. **Summary.** For each k, the mean and 95% interval (1.96 s / sqrt(episodes)) of every
   score over the episodes.
4. **Adaptation curve** (``eval.curve_steps``, off by default). On the same episodes and query
   images, the score after each listed number of steps S (0: theta itself, or the new head's
   prototype start), for every k: the figure where meta-learning claims its advantage. One
   adaptation per (k, episode) runs to the largest S and is scored on the way
   (``MetaLearner.adapt``'s ``visit``), so it costs one adaptation, not one per S, and gives
   the numbers a separate ``eval.adapt_steps=S`` run gives. Learned per-step rates (Meta-SGD,
   MAML++) reuse the last trained step's rates beyond K, as ``adapt`` always does.

Under torchrun the episodes are split over the processes (``metaseg.engine.distributed``) and
gathered in episode order, so every process returns the numbers one process would.

Scores come from confusion matrices (``metaseg.metrics``): the top-level numbers are the
dataset reduction, ``"image"`` holds the image reduction. Scoring runs under
``torch.inference_mode`` in batches (``metaseg.engine.evaluation.scoring``); only adaptation builds a
graph.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
import zlib
from typing import Any, Optional, Sequence

import numpy as np
import torch
from omegaconf import ListConfig, OmegaConf, open_dict
from torch import nn
from torch.utils.data import Dataset

from metaseg.data.tasks import collate
from metaseg.engine.distributed import episode_share, gather, is_main
from metaseg.engine.evaluation.report import render_gallery
from metaseg.engine.evaluation.scoring import MODES, predictions
from metaseg.meta.maml import IGNORE_INDEX, MetaLearner
from metaseg.metrics import PER_CLASS, ConfusionMatrix, mean_ci95, per_class_mean_ci95
from metaseg.utils.errors import ConfigError

log = logging.getLogger(__name__)
SUMMARY_KEYS = ("miou", "mf1", "pixel_acc")
BINARY_KEYS = ("fg_iou", "fg_dice")


class EvalResult(dict):
    """The ``eval.json`` structure, plus ``pictures`` (dataset name -> uint8 (3, H, W) PNG grid)
    and ``seconds`` (dataset name -> wall time).

    A ``dict`` so that every existing consumer (``write_json``, ``metrics.json``) sees plain,
    reproducible data; pictures and timings ride along as attributes because they are not
    JSON or not reproducible.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pictures: dict[str, torch.Tensor] = {}
        self.seconds: dict[str, float] = {}


# -- config -------------------------------------------------------------------------------
def shot_list(cfg: Any) -> list[int]:
    """``eval.shots`` as a list: ``5`` -> ``[5]``, ``[1, 5, 10]`` as is, ``0`` or ``[]`` -> none."""
    shots = cfg.shots
    if isinstance(shots, (list, tuple, ListConfig)):
        values = list(shots)
        if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in values):
            raise ConfigError(f"eval.shots={values} must list integers >= 1, e.g. eval.shots=[1,5,10]")
        if len(set(values)) != len(values):
            raise ConfigError(f"eval.shots={values} names a k twice; list each k once")
        return values
    if isinstance(shots, int) and not isinstance(shots, bool) and shots >= 0:
        return [shots] if shots else []
    raise ConfigError(f"eval.shots={shots!r} must be an integer >= 0 or a list of them, e.g. eval.shots=[1,5,10]")


def curve_steps(cfg: Any) -> list[int]:
    """``eval.curve_steps`` in increasing order: the step counts of the adaptation curve; ``[]``: none.

    Validated here rather than trusted from the schema, so a config built by hand (a dict, an
    older checkpoint's config) fails with the key's name, not deep inside the episode loop.
    """
    steps = cfg.get("curve_steps")
    if steps is None:
        return []
    if not isinstance(steps, (list, tuple, ListConfig)):
        raise ConfigError(f"eval.curve_steps={steps!r} must be a list of step counts >= 0, "
                          f"e.g. eval.curve_steps=[0,1,3,10,30,100]")
    values = list(steps)
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in values):
        raise ConfigError(f"eval.curve_steps={values} must list integers >= 0, e.g. eval.curve_steps=[0,1,3,10,30,100]")
    if len(set(values)) != len(values):
        raise ConfigError(f"eval.curve_steps={values} names a step count twice; list each once")
    return sorted(values)


def curve_shots(cfg: Any) -> list[int]:
    """``eval.curve_shots``: the k whose episodes the curve follows (null: every k of ``eval.shots``).

    A curve to 100 steps costs 100 adaptation steps per (k, episode); on a CPU a study can afford
    the step curve at its headline k only and read the other k from the protocol's own table."""
    ks = shot_list(cfg)
    chosen = cfg.get("curve_shots")
    if chosen is None:
        return ks
    values = list(chosen) if isinstance(chosen, (list, tuple, ListConfig)) else [chosen]
    stray = [k for k in values if k not in ks]
    if stray:
        raise ConfigError(f"eval.curve_shots={values} names k={stray} that eval.shots={ks} does not run: list k of "
                          f"eval.shots, or eval.curve_shots=null for all of them")
    return [k for k in ks if k in values]


def run_curve(cfg: Any) -> list[int]:
    """The curve's step counts this evaluation scores: none on validation tasks, which pick
    ``best.pt`` and tune adaptation at every evaluation and would pay for a figure nobody reads."""
    return [] if cfg.get("validation", False) else curve_steps(cfg)


def curve_metric(num_classes: int) -> str:
    """The curve's score: foreground Dice for a binary label space (what vessel, polyp and lesion
    papers plot), mIoU otherwise; both the dataset reduction, like the top-level scores."""
    return "fg_dice" if num_classes == 2 else "miou"


def validate_eval(cfg: Any) -> None:
    """Checks of an ``EvalConfig`` the schema cannot express; one line naming the key."""
    shot_list(cfg)
    steps = run_curve(cfg)
    if steps:
        curve_shots(cfg)
    if steps and (not shot_list(cfg) or cfg.episodes < 1):
        raise ConfigError(f"eval.curve_steps={steps} needs few-shot episodes, but eval.shots={cfg.shots} and "
                          f"eval.episodes={cfg.episodes}: set eval.shots=[1,5,10] and eval.episodes>=1, "
                          f"or eval.curve_steps=[]")
    for key, low in (("episodes", 0), ("batch_size", 1), ("pictures", 0)):
        if getattr(cfg, key) < low:
            raise ConfigError(f"eval.{key}={getattr(cfg, key)} must be >= {low}")
    for key, low in (("max_images", 1), ("window", 8), ("stride", 1), ("adapt_steps", 0)):
        value = getattr(cfg, key)
        if value is not None and value < low:
            raise ConfigError(f"eval.{key}={value} must be >= {low} (or null)")
    if cfg.adapt_lr is not None and not cfg.adapt_lr > 0:
        raise ConfigError(f"eval.adapt_lr={cfg.adapt_lr} must be > 0 (or null: the meta config's inner_lr)")
    if cfg.mode not in MODES:
        raise ConfigError(f"eval.mode={cfg.mode!r} is not one of {', '.join(MODES)}")


PATCH_MODE_FIX = ("data.patches=true: the model works on patches, so whole images are scored with a sliding "
                  "window; set eval.mode=slide")


def patch_mode(dataset: Dataset, name: str, cfg: Any) -> Any:
    """``cfg`` for scoring ``dataset``: a patch model (``data.patches``) scores whole images by
    sliding window, so ``resize`` (which would score one centre patch) is an error for held-out
    data; validation tasks (``cfg.validation``, set by :mod:`metaseg.engine.evaluation.validation`) are
    switched to ``slide`` with the evaluation's window and stride. They once scored centre
    patches, a cheap proxy that misled: the centre of a fundus photograph is its nearly
    vessel-free fovea, so validation Dice there said nothing about vessels."""
    transform = dataset_transform(dataset)
    if not getattr(transform, "patch", False) or cfg.mode == "slide":
        return cfg
    if not cfg.get("validation", False):
        raise ConfigError(f"dataset {name!r}: {PATCH_MODE_FIX}")
    cfg = copy.deepcopy(cfg) if OmegaConf.is_config(cfg) else OmegaConf.create(dict(cfg))
    with open_dict(cfg):
        cfg.mode = "slide"
    return cfg


def check_heldout_sizes(datasets: dict[str, Dataset], cfg: Any) -> None:
    """Every held-out dataset must keep at least one image to score after the largest support."""
    largest = max(shot_list(cfg), default=0)
    if not largest or cfg.episodes < 1:
        return
    for name, ds in datasets.items():
        if len(ds) <= largest:
            raise ConfigError(f"held-out dataset {name!r} has {len(ds)} images: eval.shots={largest} leaves "
                              f"none to score; lower eval.shots")


def sliding_window(dataset: Dataset, cfg: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    """Window (h, w) and stride (h, w) for ``eval.mode=slide``: default window = the training size."""
    if cfg.window is not None:
        window = (int(cfg.window), int(cfg.window))
    else:
        h, w = dataset[0][0].shape[-2:]
        window = (int(h), int(w))
    if cfg.stride is not None:
        stride = (int(cfg.stride), int(cfg.stride))
    else:
        stride = (max(window[0] // 2, 1), max(window[1] // 2, 1))
    return window, stride


# -- scoring ------------------------------------------------------------------------------
@torch.inference_mode()
def score(model: nn.Module, dataset: Dataset, indices: Sequence[int], num_classes: int,
          device: torch.device, batch_size: int, precision, *, mode: str = "resize",
          window=None, stride=None, capture: Optional[dict] = None) -> dict:
    """Scores of ``model`` on ``indices``: dataset reduction at the top level, image reduction in ``"image"``.

    ``capture``: a dict whose keys are image indices; their predicted label maps are stored
    in it (on the CPU), so pictures show exactly what was scored.
    """
    model.eval()
    cm = ConfusionMatrix(num_classes, IGNORE_INDEX, device=device, per_image=True)
    for chunk, pred, mask in predictions(model, dataset, indices, device, batch_size, precision,
                                         mode=mode, window=window, stride=stride):
        cm.update(pred, mask)
        if capture is not None:
            for j, i in enumerate(chunk):
                if i in capture:
                    capture[i] = pred[j].to("cpu", torch.int64)
    out = cm.compute("dataset")
    out["image"] = cm.compute("image")
    return out


def support_batch(dataset: Dataset, support: Sequence[int], cfg: Any, key: Sequence[int]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The images an episode adapts on: the support images themselves, or, when the dataset
    serves patches (``data.patches``), ``eval.support_patches`` random patches of each, their
    places drawn from a generator seeded by ``key`` (seed, dataset, episode, k)."""
    patches = getattr(dataset, "support_patches", None)
    if patches is None or not getattr(dataset_transform(dataset), "patch", False):
        return collate(dataset, support)
    g = torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))
    return patches(support, int(cfg.get("support_patches", 8)), g)


def dataset_transform(dataset: Dataset):
    """The ``JointTransform`` under a mix dataset's views (Subset, IndexView, Normalized), or None."""
    for _ in range(8):
        transform = getattr(dataset, "transform", None)
        if transform is not None:
            return transform
        dataset = getattr(dataset, "source", None) or getattr(dataset, "base", None)
        if dataset is None:
            return None
    return None


def query_of(order: np.ndarray, largest: int, cap: Optional[int]) -> list[int]:
    """An episode's query: its permutation after the largest support, the next ``cap`` of them if
    capped. Taken from the permutation, not the lowest image numbers, so capped episodes score
    different images and their interval covers the choice of images."""
    rest = order[largest:]
    return sorted(rest[:cap].tolist() if cap else rest.tolist())


def episode_rng(seed: int, dataset: str, episode: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(dataset.encode()), episode])


def _summary_keys(scores: dict) -> tuple[str, ...]:
    return SUMMARY_KEYS + tuple(k for k in BINARY_KEYS if k in scores)


def _summarize(episodes: list[dict], num_classes: int) -> dict:
    """Mean and 95% CI over episodes of every summary score and every per-class score."""
    keys = _summary_keys(episodes[0])
    out: dict = {key: mean_ci95([ep[key] for ep in episodes]) for key in keys}
    out.update({key: per_class_mean_ci95([ep[key] for ep in episodes], num_classes) for key in PER_CLASS})
    return out


def evaluate_dataset(learner: MetaLearner, name: str, dataset: Dataset, num_classes: int,
                     cfg: Any, device: torch.device, seed: int, gallery: Optional[dict] = None) -> dict:
    """Zero-shot and every k's episodes on one held-out dataset (see the module docstring).

    ``gallery``: if given, filled with the picture material: ``indices`` (a few query images),
    ``zero_shot`` and ``adapted[k]`` predictions of them (episode 0).
    """
    validate_eval(cfg)
    cfg = patch_mode(dataset, name, cfg)
    n = len(dataset)
    cap = cfg.max_images
    kw: dict = {"mode": cfg.mode}
    if cfg.mode == "slide":
        kw["window"], kw["stride"] = sliding_window(dataset, cfg)
    ks = shot_list(cfg) if cfg.episodes >= 1 else []
    largest = max(ks, default=0)
    if ks and n <= largest:
        raise ConfigError(f"held-out dataset {name!r} has {n} images: eval.shots={largest} leaves none to "
                          f"score; lower eval.shots")
    orders = [episode_rng(seed, name, e).permutation(n) for e in range(cfg.episodes if ks else 0)]
    curve = run_curve(cfg)
    traced = curve_shots(cfg) if curve else []  # the k whose episodes the curve follows
    metric = curve_metric(num_classes)

    zero_indices = list(range(n))[:cap]
    if gallery is not None:
        shown = query_of(orders[0], largest, cap) if orders else zero_indices
        gallery.update(indices=shown[: cfg.pictures], zero_shot={}, adapted={}, shots=ks)
    capture = dict.fromkeys(gallery["indices"]) if gallery is not None else None
    zero = score(learner.model, dataset, zero_indices, num_classes, device, cfg.batch_size,
                 learner.precision, capture=capture, **kw)
    if gallery is not None:
        missing = [i for i in gallery["indices"] if capture[i] is None]
        if missing:  # eval.max_images: episode 0's query images may lie outside the zero-shot ones
            extra = dict.fromkeys(missing)  # predicted for the picture only, not scored
            score(learner.model, dataset, missing, num_classes, device, cfg.batch_size, learner.precision,
                  capture=extra, **kw)
            capture.update(extra)
        gallery["zero_shot"] = capture
    result: dict = {"images": n, "scored": len(zero_indices), "zero_shot": zero}
    if cfg.mode == "slide":
        result["window"], result["stride"] = list(kw["window"]), list(kw["stride"])
    if not ks:
        return result

    steps = cfg.adapt_steps if cfg.adapt_steps is not None else learner.inner_steps
    lr = cfg.adapt_lr if cfg.adapt_lr is not None else default_adapt_lr(learner)
    episodes: dict[int, list[dict]] = {k: [] for k in ks}
    query_size = min(n - largest, cap or n)
    for e in episode_share(len(orders)):  # under torchrun each process runs every world_size-th episode
        order = orders[e]
        query = query_of(order, largest, cap)
        for k in ks:
            support = order[:k]
            images, masks = support_batch(dataset, support, cfg, [seed, zlib.crc32(name.encode()), e, k])
            capture = dict.fromkeys(gallery["indices"]) if gallery is not None and e == 0 else None
            scorer = functools.partial(score, dataset=dataset, indices=query, num_classes=num_classes, device=device,
                                       batch_size=cfg.batch_size, precision=learner.precision, **kw)
            s, points = adapt_and_score(learner, images.to(device), masks.to(device), steps, lr,
                                        curve if k in traced else [], scorer, capture)
            if capture is not None:
                gallery["adapted"][k] = capture
            record = {"support": [int(i) for i in support], "seed": [seed, zlib.crc32(name.encode()), e]}
            record.update({key: s[key] for key in (*_summary_keys(s), *PER_CLASS)})
            record["image"] = {key: s["image"][key] for key in (*_summary_keys(s), *PER_CLASS)}
            record["curve"] = {t: points[t][metric] for t in points}  # gathered with the episode it belongs to
            episodes[k].append((e, record))
    episodes = {k: [r for _, r in sorted(gather(episodes[k]), key=lambda er: er[0])] for k in ks}

    summaries = {}
    for k in ks:
        eps = episodes[k]
        summary = {"shots": k, "episodes": len(eps), "adapt_steps": steps, "adapt_lr": lr,
                   "scored": query_size}
        summary.update(_summarize(eps, num_classes))
        summary["image"] = _summarize([ep["image"] for ep in eps], num_classes)
        summary["per_episode"] = [
            {"support": ep["support"], "seed": ep["seed"],
             **{key: ep[key] for key in _summary_keys(ep)},
             **{f"image_{key}": ep["image"][key] for key in _summary_keys(ep)}}
            for ep in eps]
        summaries[k] = summary
    # The first k's summary at the top level (the eval.json contract), every k under its own key.
    result["adapted"] = {**summaries[ks[0]], **{str(k): summaries[k] for k in ks}}
    if curve:
        result["curve"] = curve_summary(metric, {k: [ep["curve"] for ep in episodes[k]] for k in traced}, curve)
    return result


def adapt_and_score(learner: MetaLearner, images: torch.Tensor, masks: torch.Tensor, steps: int,
                    lr: Optional[float], curve: Sequence[int], scorer, capture: Optional[dict]
                    ) -> tuple[dict, dict[int, dict]]:
    """The scores after ``steps`` adaptation steps, and after every step count of ``curve``.

    With a curve, one adaptation runs to the largest count and ``scorer(model, capture=...)`` scores
    the model at each count on the way, the protocol's own ``steps`` included: one adaptation
    per (k, episode) serves the table and the curve. A wrapper's ``adapt`` (a new head set from
    the support) passes ``at``/``visit`` through, so its preparation holds for every count.
    """
    if not curve:
        adapted = learner.adapt(images, masks, steps=steps, lr=lr)
        return scorer(adapted, capture=capture), {}
    found: dict[int, dict] = {}

    def visit(t: int, model: nn.Module) -> None:
        found[t] = scorer(model, capture=capture if t == steps else None)

    learner.adapt(images, masks, steps=max(steps, curve[-1]), lr=lr, at=sorted({*curve, steps}), visit=visit)
    return found[steps], {t: found[t] for t in curve}


def curve_summary(metric: str, points: dict[int, list[dict[int, float]]], curve: Sequence[int]) -> dict:
    """The ``curve`` entry of ``eval.json``: ``{"metric", "shots": {k: {steps: {"mean", "ci95",
    "per_episode"}}}}``, mean and 95% CI over episodes, and each episode's value in episode order
    (episodes are seeded, so two checkpoints' values pair up for a paired comparison); keys are
    strings, as JSON has them."""
    def summary(values: list[float]) -> dict:
        m = mean_ci95(values)
        return {"mean": m["mean"], "ci95": m["ci95"], "per_episode": [float(v) for v in values]}

    return {"metric": metric,
            "shots": {str(k): {str(t): summary([ep[t] for ep in eps]) for t in curve} for k, eps in points.items()}}


def default_adapt_lr(learner: MetaLearner) -> Optional[float]:
    """``eval.adapt_lr`` null: the learner's learned step sizes (None, Meta-SGD / LSLR) if any, else alpha."""
    return None if getattr(learner, "step_sizes", None) is not None else learner.inner_lr


def protocol(cfg: Any, learner: MetaLearner, seed: int) -> dict:
    """The inputs that fix every number: recorded in ``eval.json`` next to the scores."""
    return {
        "mode": cfg.mode, "shots": shot_list(cfg), "episodes": cfg.episodes, "seed": seed,
        "adapt_steps": cfg.adapt_steps if cfg.adapt_steps is not None else learner.inner_steps,
        "adapt_lr": cfg.adapt_lr if cfg.adapt_lr is not None else default_adapt_lr(learner),
        "batch_size": cfg.batch_size, "max_images": cfg.max_images, "window": cfg.window, "stride": cfg.stride,
        "episode_rng": "numpy.random.default_rng([seed, zlib.crc32(dataset), episode]).permutation(n): "
                       "support = first k, query = the rest after the largest k (the next eval.max_images of them if set)",
        "reductions": "top-level scores: dataset reduction (one confusion matrix over all scored images); "
                      "'image': image reduction (per-image scores averaged)",
        "ci95": "1.96 * sample std / sqrt(episodes)",
        **({"curve_steps": run_curve(cfg)} if run_curve(cfg) else {}),
    }


def _dataset_means(datasets: dict) -> dict:
    per = list(datasets.values())
    mean = {"zero_shot_miou": float(np.mean([r["zero_shot"]["miou"] for r in per])),
            "zero_shot_mf1": float(np.mean([r["zero_shot"]["mf1"] for r in per]))}
    for key in BINARY_KEYS:  # binary label spaces: the foreground's zero-shot scores (erm's best.pt, learning curve)
        if per and all(key in r["zero_shot"] for r in per):
            mean[f"zero_shot_{key}"] = float(np.mean([r["zero_shot"][key] for r in per]))
    if per and all("adapted" in r for r in per):
        mean["adapted_miou"] = float(np.mean([r["adapted"]["miou"]["mean"] for r in per]))
        mean["adapted_mf1"] = float(np.mean([r["adapted"]["mf1"]["mean"] for r in per]))
        for key in BINARY_KEYS:  # binary label spaces: the foreground's own scores (tune, best.pt can use them)
            if all(key in r["adapted"] for r in per):
                mean[f"adapted_{key}"] = float(np.mean([r["adapted"][key]["mean"] for r in per]))
        ks = [key for key in per[0]["adapted"] if key.isdigit()]
        mean["adapted"] = {k: {m: float(np.mean([r["adapted"][k][m]["mean"] for r in per])) for m in ("miou", "mf1")}
                           for k in ks}
    return mean


def evaluate_heldout(learner: MetaLearner, datasets: dict[str, Dataset], num_classes: int,
                     cfg: Any, device: torch.device, seed: int,
                     classes: Optional[Sequence[str]] = None, label: Optional[str] = None) -> EvalResult:
    """Evaluate every held-out dataset; returns the ``eval.json`` structure (pictures attached).

    ``label`` names the model in the log lines (``[synth_4, random init] ...``) when it is not the one
    the run is about (the random-init baseline)."""
    validate_eval(cfg)
    names = list(classes) if classes else [f"class {c}" for c in range(num_classes)]
    out = EvalResult({"classes": list(classes) if classes else None, "protocol": protocol(cfg, learner, seed),
                      "datasets": {}})
    for name, ds in datasets.items():
        t0 = time.perf_counter()
        gallery: Optional[dict] = {} if cfg.pictures > 0 and is_main() else None  # episode 0 is rank 0's
        res = evaluate_dataset(learner, name, ds, num_classes, cfg, device, seed, gallery)
        out.seconds[name] = time.perf_counter() - t0
        out["datasets"][name] = res
        if gallery is not None and gallery["indices"]:
            out.pictures[name] = render_gallery(name, ds, gallery, names, mode=cfg.mode)
        z = res["zero_shot"]
        msg = f"[{name}{', ' + label if label else ''}] zero-shot mIoU {z['miou']:.3f} mF1 {z['mf1']:.3f}"
        for k in shot_list(cfg) if "adapted" in res else []:
            a = res["adapted"][str(k)]
            msg += (f" | {k}-shot mIoU {a['miou']['mean']:.3f} +- {a['miou']['ci95']:.3f}"
                    f" mF1 {a['mf1']['mean']:.3f} +- {a['mf1']['ci95']:.3f}")
        log.info("%s (%.1fs)", msg, out.seconds[name])
        if "curve" in res:
            log.info("[%s] adaptation curve, %s after steps: %s", name, res["curve"]["metric"], "; ".join(
                f"{k}-shot " + " ".join(f"{t}:{v['mean']:.3f}" for t, v in by_steps.items())
                for k, by_steps in res["curve"]["shots"].items()))
    if datasets:
        out["mean"] = _dataset_means(out["datasets"])
    return out
