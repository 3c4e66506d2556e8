"""``metaseg-predict``'s engine: adapt to a few labelled images, then segment a whole folder.

The user story the project serves: "I have 5 labelled images of a new kind of data and 500
unlabelled ones: give me masks."

1. **Model.** A checkpoint (any algorithm, ``erm`` included) with its size, mean/std and
   adaptation settings, or ``checkpoint=none``: the ``model`` group at random init, which only
   makes sense fine-tuned on a support. ``metaseg-eval``'s loader loads it (``engine/load.py``),
   so a support whose classes differ from the checkpoint's gets a new head, set from the support
   prototypes, exactly as in evaluation.
2. **Adaptation** (when ``support`` is given). Every image of the support folder, read with the
   ``data`` group (``data=folder``: the same layout, value mapping and checks as everywhere
   else) at the checkpoint's size, is one support batch; ``MetaLearner.adapt`` takes
   ``adapt.steps`` steps at ``adapt.lr`` (null: the checkpoint's K and alpha, or its learned
   step sizes) on a copy of the model. Without a support the checkpoint predicts as it is.
3. **Segmentation.** Every image of ``images`` at its own size: ``mode=resize`` runs the model
   on the image resized to the training size (as the support was) and upsamples the logits
   bilinearly to the original size before the argmax; ``mode=slide`` covers the original
   resolution with windows of the training size (``engine/evaluation/scoring.py``, as ``eval.mode=slide``).
   Images go through in batches of ``batch_size`` (slide: windows), decoded and written by a
   thread pool, with a progress bar. With ``model.norm: batch`` every forward batch is
   normalised by its own statistics, so ``batch_size`` is part of what is predicted, as in
   evaluation. An image that cannot be read is skipped and named at the end, never fatal.
4. **Outputs** in ``out``: ``masks/<stem>.png`` and ``overlays/<stem>.png``
   (``engine/prediction/files.py``), ``predict.json`` (what was done, per image and skipped), and
   with ``save_adapted`` the adapted model (``engine/prediction/export.py``). Every file is written
   atomically.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf, open_dict
from PIL import Image
from torch import nn
from torch.utils.data import ConcatDataset
from tqdm.auto import tqdm

from metaseg.data.decode import fit_image
from metaseg.data.tasks import collate
from metaseg.engine.prediction.export import (
    ADAPTED_CHECKPOINT, ADAPTED_SMP, adapted_config, export_smp, save_adapted_checkpoint)
from metaseg.engine.evaluation.scoring import MODES, slide
from metaseg.engine.load import NO_CHECKPOINT, Source, adaptation_learner, is_baseline, load
from metaseg.engine.prediction.files import (
    MASK_FORMATS, MaskWriter, list_images, load_rgb, save_overlay, support_values)
from metaseg.meta.precision import Precision
from metaseg.utils.errors import ConfigError
from metaseg.utils.runtime import resolve_device, seed_everything, write_json

log = logging.getLogger(__name__)
MASKS, OVERLAYS, SUMMARY = "masks", "overlays", "predict.json"
SHOW_SKIPPED = 20  # skipped files named in the log; predict.json lists all


def validate_predict(cfg: Any) -> None:
    """Checks of a ``PredictConfig`` the schema cannot express; one line naming the key."""
    for key, what in (("checkpoint", "a metaseg checkpoint (.pt) or none"), ("images", "the folder of images to "
                      "segment"), ("out", "the folder to write masks/ and overlays/ to")):
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(f"{key} is not set: give {key}=... ({what})")
    if cfg.mode not in MODES:
        raise ConfigError(f"mode={cfg.mode!r} is not one of {', '.join(MODES)}")
    if cfg.masks not in MASK_FORMATS:
        raise ConfigError(f"masks={cfg.masks!r} is not one of {', '.join(MASK_FORMATS)}")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size} must be >= 1")
    for key, low in (("window", 8), ("stride", 1), ("workers", 1)):
        value = cfg[key]
        if value is not None and value < low:
            raise ConfigError(f"{key}={value} must be >= {low} (or null)")
    if not 0 <= cfg.overlay_alpha <= 1:
        raise ConfigError(f"overlay_alpha={cfg.overlay_alpha} must be in [0, 1]")
    if cfg.adapt.steps is not None and cfg.adapt.steps < 0:
        raise ConfigError(f"adapt.steps={cfg.adapt.steps} must be >= 0 (or null: the checkpoint's meta.inner_steps)")
    if cfg.adapt.lr is not None and not cfg.adapt.lr > 0:
        raise ConfigError(f"adapt.lr={cfg.adapt.lr} must be > 0 (or null: the checkpoint's step sizes)")
    if not has_support(cfg):
        for key in ("steps", "lr"):
            if cfg.adapt[key] is not None:
                raise ConfigError(f"adapt.{key}={cfg.adapt[key]} but there is no support to adapt on: give "
                                  f"support=DIR (labelled images), or drop adapt.{key} for zero-shot prediction")
    out = Path(os.path.expanduser(str(cfg.out)))
    blocking = next((p for p in (out, *out.parents) if p.exists()), None)  # the nearest thing that exists
    if blocking is not None and not blocking.is_dir():
        where = "is a file" if blocking == out else f"lies under the file {str(blocking)!r}"
        raise ConfigError(f"out={str(cfg.out)!r} {where}; give a folder to write masks/, overlays/ and "
                          f"{SUMMARY} to (it is created if missing)")
    if cfg.support is not None and not Path(os.path.expanduser(str(cfg.support))).is_dir():
        raise ConfigError(f"support={str(cfg.support)!r} is not a folder; give the labelled folder "
                          f"(images/<stem>.png|jpg + masks/<stem>.png), or leave support out for zero-shot")


def has_support(cfg: Any) -> bool:
    """A support to adapt on: ``support=DIR``, or a ``data`` group with a root (``support=DIR`` is ``data.root=DIR``)."""
    return cfg.support is not None or (cfg.data is not None and cfg.data.get("root") is not None)


def support_data(cfg: Any) -> Optional[Any]:
    """The ``data`` config that reads the support; None: zero-shot."""
    if not has_support(cfg):
        return None
    if cfg.data is None:
        raise ConfigError("support= needs a data group to read it with: data=folder")
    data = copy.deepcopy(cfg.data)
    if cfg.support is not None:
        with open_dict(data):
            data.root = os.path.expanduser(str(cfg.support))
    return data


def _support_set(mix) -> tuple[Any, Optional[Any]]:
    """Every held-out dataset of the support mix as one dataset, and its label map when there is one dataset."""
    parts = list(mix.heldout.values())
    labels = getattr(parts[0].base, "labels", None) if len(parts) == 1 else None  # a folder's files have one
    return (parts[0] if len(parts) == 1 else ConcatDataset(parts)), labels


def load_source(cfg: Any) -> tuple[Source, Optional[Any], Optional[Any]]:
    """The model (checkpoint or ``checkpoint=none``, ``engine/load.py``) and, when a support is given, the support
    as one dataset (normalised, at the source's size) and its LabelMap (``masks=support``), if it has one."""
    data = support_data(cfg)
    baseline = is_baseline(cfg.checkpoint)
    if baseline and data is None:
        raise ConfigError("checkpoint=none has nothing to predict with: give support=DIR, the labelled images "
                          "to fine-tune a random-init model on, or a trained checkpoint=CKPT")
    source = load(None if baseline else str(cfg.checkpoint), data, model=cfg.model, meta=cfg.meta, seed=cfg.seed)
    support, labels = _support_set(source.mix) if source.mix is not None else (None, None)
    return source, support, labels


def _adapt(source: Source, support: Optional[Any], cfg: Any, device: torch.device,
           precision: Precision) -> tuple[nn.Module, dict]:
    """The model adapted on the whole ``support`` (or the model itself, zero-shot), and a record of it."""
    model = source.model.to(device)
    if support is None:
        return model, {}
    learner = adaptation_learner(model, source.meta_cfg, precision, source.head, source.meta_state)
    images, masks = collate(support, range(len(support)))
    images, masks = images.to(device), masks.to(device)
    steps = cfg.adapt.steps if cfg.adapt.steps is not None else learner.inner_steps
    t0 = time.perf_counter()
    adapted = learner.adapt(images, masks, steps=steps, lr=cfg.adapt.lr)
    seconds = time.perf_counter() - t0
    with torch.no_grad(), precision.autocast():  # a new head starts at zero: loss log(K) before
        before = float(learner.loss(model.train()(images).float(), masks))
        after = float(learner.loss(adapted.train()(images).float(), masks))
    log.info("adapted on %d support image(s): %d step(s) at lr %s; support loss %.4f -> %.4f (%.1fs)", len(images),
             steps, cfg.adapt.lr if cfg.adapt.lr is not None else f"{learner.inner_lr:g} (the checkpoint's)", before,
             after, seconds)
    stems = [p.stem for ds in getattr(support, "datasets", [support]) for p in ds.base.pairs]
    record = {"images": len(images), "stems": stems, "root": str(source.data_cfg.root),
              "steps": int(steps), "lr": cfg.adapt.lr, "checkpoint_lr": learner.inner_lr,
              "support_loss_before": before, "support_loss_after": after, "seconds": seconds}
    return adapted, record


class Segmenter:
    """Label maps of whole images at their own size: ``resize`` or ``slide`` (module docstring, 3)."""

    def __init__(self, model: nn.Module, source: Source, cfg: Any, device: torch.device, precision: Precision):
        self.model, self.device, self.precision = model.eval(), device, precision
        self.size, self.mode, self.batch_size = source.size, cfg.mode, cfg.batch_size
        self.mean = torch.tensor(source.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(source.std, dtype=torch.float32).view(-1, 1, 1)
        window = int(cfg.window) if cfg.window is not None else self.size
        stride = int(cfg.stride) if cfg.stride is not None else max(window // 2, 1)
        self.window, self.stride = (window, window), (stride, stride)

    def tensor(self, image: Image.Image) -> torch.Tensor:
        """RGB -> normalised (3, H, W), as the datasets give images to the model."""
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def resize(self, images: Sequence[Image.Image]) -> list[np.ndarray]:
        batch = torch.stack([self.tensor(fit_image(im, (self.size, self.size))) for im in images]).to(self.device)
        with self.precision.autocast():
            logits = self.model(batch)
        out = []
        for im, lg in zip(images, logits.float()):
            w, h = im.size
            up = F.interpolate(lg[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            out.append(up.argmax(0).to("cpu", torch.uint8).numpy())
        return out

    @torch.inference_mode()
    def slide(self, items: Iterator[tuple[int, Image.Image, Any]]) -> Iterator[tuple[Any, np.ndarray]]:
        """``(tag, labels)`` for each ``(index, image, tag)`` of ``items``, in order."""
        tensors = ((i, self.tensor(im).to(self.device), tag) for i, im, tag in items)
        for _, logits, tag in slide(self.model, tensors, self.window, self.stride, self.batch_size, self.precision):
            yield tag, logits.argmax(0).to("cpu", torch.uint8).numpy()


def _chunks(items: Sequence, n: int) -> Iterator[Sequence]:
    for start in range(0, len(items), n):
        yield items[start : start + n]


def segment_folder(cfg: Any) -> dict:
    """Adapt (if a support is given), segment every image of ``cfg.images`` into ``cfg.out``; returns predict.json."""
    t0 = time.perf_counter()
    validate_predict(cfg)
    seed_everything(cfg.seed)
    files = list_images(Path(os.path.expanduser(str(cfg.images))))
    out = Path(os.path.expanduser(str(cfg.out)))
    device = resolve_device(cfg.device)
    precision = Precision(cfg.precision, device.type)
    source, support, labels = load_source(cfg)
    if cfg.masks == "support" and labels is None:
        raise ConfigError("masks=support needs one labelled support dataset to take the mask values from: give "
                          "support=DIR, or use masks=index")
    model, adapted = _adapt(source, support, cfg, device, precision)
    writer = MaskWriter(source.classes, support_values(labels, source.classes) if cfg.masks == "support"
                        else None)
    segmenter = Segmenter(model, source, cfg, device, precision)
    log.info("segmenting %d image(s) of %s into %s: %s mode at %d px, classes %s", len(files), cfg.images, out,
             cfg.mode, source.size, source.classes)

    workers = int(cfg.workers) if cfg.workers is not None else max(1, min(8, os.cpu_count() or 1))
    written: dict[str, dict] = {}
    skipped: list[dict] = []
    stats_batch: list[torch.Tensor] = []  # zero-shot save_adapted: running statistics from the first batch
    bar = tqdm(total=len(files), desc="segment", unit="img", disable=None, dynamic_ncols=True)
    with ThreadPoolExecutor(workers) as pool:
        pending: list = []

        def write(path: Path, image: Image.Image, labels: np.ndarray) -> None:
            stem = path.stem
            record = {"file": path.name, "size": [image.size[0], image.size[1]], "mask": f"{MASKS}/{stem}.png",
                      "share": (np.bincount(labels.ravel(), minlength=len(source.classes))[: len(source.classes)]
                                / labels.size).round(6).tolist()}
            pending.append(pool.submit(writer.save, labels, out / MASKS / f"{stem}.png"))
            if cfg.overlays:
                record["overlay"] = f"{OVERLAYS}/{stem}.png"
                pending.append(pool.submit(save_overlay, image, labels, source.classes, cfg.overlay_alpha,
                                           out / OVERLAYS / f"{stem}.png"))
            written[stem] = record

        def flush() -> None:
            for future in pending:
                future.result()  # a failed write (disk full, permissions) stops the run: it is not bad input
            pending.clear()

        def readable(chunk: Sequence[Path]) -> list[tuple[Path, Image.Image]]:
            good = []
            for path, (image, why) in zip(chunk, pool.map(load_rgb, chunk)):
                if image is None:
                    skipped.append({"file": path.name, "reason": why})
                    bar.update(1)
                else:
                    good.append((path, image))
            if not stats_batch and good and cfg.save_adapted and support is None:
                stats_batch.extend(segmenter.tensor(fit_image(im, (source.size, source.size))) for _, im in good)
            return good

        if cfg.mode == "resize":
            for chunk in _chunks(files, cfg.batch_size):
                good = readable(chunk)
                if good:
                    for (path, image), labels in zip(good, segmenter.resize([im for _, im in good])):
                        write(path, image, labels)
                    bar.update(len(good))
                flush()
        else:
            def items():
                for chunk in _chunks(files, workers):
                    for path, image in readable(chunk):
                        yield 0, image, (path, image)

            for (path, image), labels in segmenter.slide(items()):
                write(path, image, labels)
                bar.update(1)
                if len(pending) >= 4 * workers:
                    flush()
        flush()
    bar.close()

    result: dict = {
        "checkpoint": NO_CHECKPOINT if is_baseline(cfg.checkpoint) else str(cfg.checkpoint),
        "step": source.step, "classes": source.classes, "head": source.head,
        "support": adapted or None,
        "mode": cfg.mode, "size": source.size, "batch_size": cfg.batch_size,
        "window": list(segmenter.window) if cfg.mode == "slide" else None,
        "stride": list(segmenter.stride) if cfg.mode == "slide" else None,
        "masks": cfg.masks, "images": len(files), "written": len(written), "skipped": skipped,
        "files": written,
    }
    if cfg.save_adapted:
        result["adapted_model"] = _save_adapted(model, source, support, cfg, out, adapted, stats_batch)
    result["config"] = OmegaConf.to_container(cfg, resolve=True)
    result["seconds"] = time.perf_counter() - t0
    write_json(out / SUMMARY, result)
    log.info("wrote %d mask(s)%s to %s", len(written), " and overlays" if cfg.overlays else "", out)
    if skipped:
        names = ", ".join(f"{s['file']} ({s['reason']})" for s in skipped[:SHOW_SKIPPED])
        more = f" and {len(skipped) - SHOW_SKIPPED} more (all in {SUMMARY})" if len(skipped) > SHOW_SKIPPED else ""
        log.warning("skipped %d image(s) that could not be read: %s%s", len(skipped), names, more)
    return result


def _save_adapted(model: nn.Module, source: Source, support: Optional[Any], cfg: Any, out: Path, adapted: dict,
                  stats_batch: list[torch.Tensor]) -> dict:
    """``adapted.pt`` and ``adapted_smp/`` (``engine/prediction/export.py``): their paths, relative to ``out``."""
    config = adapted_config(source.train_cfg, source.data_cfg, source.model_cfg, source.meta_cfg, cfg.seed)
    record = {"from": NO_CHECKPOINT if is_baseline(cfg.checkpoint) else str(cfg.checkpoint), **(adapted or {})}
    save_adapted_checkpoint(out / ADAPTED_CHECKPOINT, model, source=source.checkpoint, config=config,
                            classes=source.classes, step=source.step, record=record)
    if support is not None:
        stats = collate(support, range(len(support)))[0]
    elif stats_batch:
        stats = torch.stack(stats_batch)
    else:  # nothing was readable
        stats = None
    smp_dir = export_smp(model, source.model_cfg.norm, out / ADAPTED_SMP, stats) if stats is not None else None
    log.info("saved the adapted model: %s%s", out / ADAPTED_CHECKPOINT, f" and {smp_dir}" if smp_dir else "")
    return {"checkpoint": ADAPTED_CHECKPOINT, "smp": ADAPTED_SMP if smp_dir else None}
