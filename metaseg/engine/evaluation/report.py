"""What a researcher reads and publishes from an evaluation: ``eval.md``, ``eval.csv`` and PNG grids.

* ``eval.md``: Markdown tables to paste, datasets x {zero-shot, k-shot}, in percent, k-shot
  cells as mean +- 95% CI over episodes; with the random-init baseline (``eval.baseline``) first
  the summary's comparison (``metaseg.engine.evaluation.summary``), then one table per metric and
  reduction, then per-class IoU.
* ``eval.csv``: the same numbers in long form (one row per dataset, setting, k, reduction,
  metric and class), for pandas or a spreadsheet; fractions, not percent.
* ``pictures/<dataset>.png``: a few query images of episode 0, one row each:
  image | ground truth | zero-shot prediction | k-shot prediction for every k, with each
  prediction's own mIoU under it and a class legend.
* ``curve.png`` (``eval.curve_steps``): the adaptation curve, the score against adaptation
  steps with one line per k and its 95% CI shaded, one panel per held-out dataset; its
  numbers are tabled in ``eval.md`` (rows k, columns steps).

All files are written atomically: a reader sees the previous file or the complete new one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

from metaseg.data.view import SegmentationDataset
from metaseg.engine.evaluation import summary
from metaseg.engine.evaluation.results import Curve, Estimate, Results
from metaseg.metrics import PER_CLASS, segmentation_scores
from metaseg.utils.masks import IGNORE
from metaseg.utils.runtime import atomic_write
from metaseg.utils.tables import csv_text, markdown_table

# Distinct colours (after Sasha Trubetskoy's list); class 0 is black. Binary tasks: black/white.
PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
           (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0),
           (255, 215, 180), (0, 0, 128)]
IGNORE_COLOUR = (128, 128, 128)
PANEL = 192  # panels are fitted into PANEL x PANEL pixels
MARGIN, GAP, HEADER, CAPTION = 10, 8, 22, 20
BG, INK, LETTERBOX = (255, 255, 255), (20, 20, 20), (225, 225, 225)


def palette(num_classes: int) -> list[tuple[int, int, int]]:
    if num_classes == 2:
        return [(0, 0, 0), (255, 255, 255)]
    colours = list(PALETTE[:num_classes])
    rng = np.random.default_rng(0)
    while len(colours) < num_classes:
        colours.append(tuple(int(v) for v in rng.integers(40, 256, 3)))
    return colours


def colorize(labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """Label map (H, W) -> RGB uint8 (H, W, 3); ignored pixels grey."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:num_classes] = palette(num_classes)
    lut[IGNORE] = IGNORE_COLOUR
    return lut[labels.to(torch.int64).clamp(0, 255).cpu().numpy()]


def display_image(dataset: SegmentationDataset, image: torch.Tensor) -> np.ndarray:
    """A normalised (C, H, W) image back to RGB uint8: the dataset's mean/std when it has them, else min-max."""
    image = image.detach().float().cpu()
    norm = dataset.normalisation
    if norm is not None and norm[0].numel() == image.shape[0]:
        mean, std = norm
        image = image * std.view(-1, 1, 1) + mean.view(-1, 1, 1)
    else:
        lo = image.amin((1, 2), keepdim=True)
        hi = image.amax((1, 2), keepdim=True)
        image = (image - lo) / (hi - lo).clamp(min=1e-8)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    image = image[:3].clamp(0, 1)
    return (image.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def _fit(rgb: np.ndarray, box: int = PANEL) -> Image.Image:
    """Scale to fit ``box``: nearest when enlarging (pixels stay crisp), Lanczos when shrinking (thin lines survive)."""
    img = Image.fromarray(rgb)
    h, w = rgb.shape[:2]
    scale = box / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(size, Image.NEAREST if scale >= 1 else Image.LANCZOS)


def load_font(size: int = 13):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font only
        return ImageFont.load_default()


def legend_lines(entries: Sequence[tuple[tuple[int, int, int], str]], width: int, font, box: int = 16,
                 margin: int = MARGIN) -> list[list[tuple[int, tuple[int, int, int], str]]]:
    """Lay legend ``entries`` (colour, name) out in lines that fit ``width``: ``[[(x, colour, name), ...], ...]``."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines, line, x = [], [], margin
    for colour, name in entries:
        w = box + box * 6 // 16 + int(probe.textlength(name, font=font)) + box
        if line and x + w > width - margin:
            lines.append(line)
            line, x = [], margin
        line.append((x, colour, name))
        x += w
    if line:
        lines.append(line)
    return lines


def draw_legend(draw: ImageDraw.ImageDraw, lines: list, y: int, font, box: int = 16) -> int:
    """Draw the ``legend_lines`` from height ``y`` down: a swatch and a name per entry; returns the y below."""
    step = box * 22 // 16
    pad = box // 8
    for line in lines:
        for x, colour, name in line:
            draw.rectangle([x, y + pad, x + box, y + pad + box - 2], fill=colour, outline=(90, 90, 90))
            draw.text((x + box + box * 6 // 16, y + pad), name, fill=INK, font=font)
        y += step
    return y


def render_grid(title: str, rows: Sequence[dict], columns: Sequence[str], classes: Sequence[str],
                show_ignore: bool = False) -> torch.Tensor:
    """Draw rows of panels under column headers, with a legend; returns uint8 (3, H, W).

    Each row is ``{"panels": [RGB uint8 arrays], "captions": [str]}``, one panel per column.
    """
    font, bold = load_font(13), load_font(15)
    ncols = len(columns)
    width = max(2 * MARGIN + ncols * PANEL + (ncols - 1) * GAP, 420)
    colours = palette(len(classes))
    legend = [(c, name) for c, name in zip(colours, classes)]
    if show_ignore:
        legend.append((IGNORE_COLOUR, "ignored"))
    lines = legend_lines(legend, width, font)
    top = MARGIN + HEADER + HEADER
    row_h = PANEL + CAPTION + GAP
    height = top + len(rows) * row_h + len(lines) * 22 + MARGIN
    canvas = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(canvas)
    draw.text((MARGIN, MARGIN), title, fill=INK, font=bold)
    for j, name in enumerate(columns):
        draw.text((MARGIN + j * (PANEL + GAP), MARGIN + HEADER + 2), name, fill=INK, font=font)
    for r, row in enumerate(rows):
        y = top + r * row_h
        for j, (panel, caption) in enumerate(zip(row["panels"], row["captions"])):
            x = MARGIN + j * (PANEL + GAP)
            img = _fit(panel)
            # letterbox in light grey, so that white labels (binary foreground) stay visible at the edges
            draw.rectangle([x - 1, y - 1, x + PANEL, y + PANEL], fill=LETTERBOX, outline=(200, 200, 200))
            canvas.paste(img, (x + (PANEL - img.width) // 2, y + (PANEL - img.height) // 2))
            draw.text((x, y + PANEL + 3), caption, fill=INK, font=font)
    draw_legend(draw, lines, top + len(rows) * row_h, font)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).contiguous()


def render_gallery(name: str, dataset: Dataset, gallery: dict, classes: Sequence[str], mode: str = "resize") -> torch.Tensor:
    """The PNG grid of one held-out dataset from the predictions ``evaluate_dataset`` captured."""
    num_classes = len(classes)
    ks = [k for k in gallery["shots"] if k in gallery["adapted"]]
    columns = ["image", "ground truth", "zero-shot"] + [f"{k}-shot" for k in ks]
    rows, show_ignore = [], False
    for index in gallery["indices"]:
        image, mask = dataset.full_resolution(index) if mode == "slide" else dataset[index]
        show_ignore |= bool((mask == IGNORE).any())
        preds = [gallery["zero_shot"][index]] + [gallery["adapted"][k][index] for k in ks]
        captions = [f"#{index}  {mask.shape[-1]}x{mask.shape[-2]}", ""]
        for pred in preds:
            miou = segmentation_scores(pred[None], mask[None].to(pred.device), num_classes)["miou"]
            captions.append(f"mIoU {miou:.2f}" if not math.isnan(miou) else "mIoU n/a")
        panels = [display_image(dataset, image), colorize(mask, num_classes)]
        panels += [colorize(p, num_classes) for p in preds]
        rows.append({"panels": panels, "captions": captions})
    what = f"query images of episode 0, {mode} mode" if ks else f"{mode} mode"
    return render_grid(f"{name}: {what}", rows, columns, classes, show_ignore)


def save_png(grid: torch.Tensor, path: str | Path) -> None:
    image = Image.fromarray(grid.permute(1, 2, 0).cpu().numpy())
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


# -- tables -------------------------------------------------------------------------------
def _num(value: Any) -> Optional[float]:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _cell(mean: Any, ci: Any = None) -> str:
    m = _num(mean)
    if m is None:
        return "–"
    c = _num(ci)
    return f"{100 * m:.1f}" if c is None else f"{100 * m:.1f} ± {100 * c:.1f}"


def _estimate_cell(estimate: Optional[Estimate]) -> str:
    return _cell(estimate.mean, estimate.ci95) if estimate is not None else "–"


def _header(first: str, ks: Sequence[int]) -> list[str]:
    """A table's header: ``first``, zero-shot, then a column per k (none without episodes)."""
    return [first, "zero-shot", *[f"{k}-shot" for k in ks]]


def _metric_table(results: Results, metric: str, reduction: str) -> list[str]:
    ks = results.shots
    rows, zero_col, k_cols = [], [], {k: [] for k in ks}
    for name, res in results.datasets.items():
        z = res.zero_shot.get(metric, reduction)
        zero_col.append(_num(z))
        cells = [name, _cell(z)]
        for k in ks:
            a = res.adapted[k].get(metric, reduction) if k in res.adapted else None
            k_cols[k].append(_num(a.mean) if a else None)
            cells.append(_estimate_cell(a))
        rows.append(cells)
    if len(results.datasets) > 1:
        def avg(col):
            vals = [v for v in col if v is not None]
            return sum(vals) / len(vals) if len(vals) == len(col) and vals else None
        rows.append(["**mean**", _cell(avg(zero_col)), *[_cell(avg(k_cols[k])) for k in ks]])
    return markdown_table(_header("dataset", ks), rows, align="lr")


def markdown_report(result: dict) -> str:
    """``eval.md``: the tables a user can paste, and the protocol that produced them."""
    p = result.get("protocol", {})
    results = Results.from_dict(result)
    ks = results.shots
    out = ["# metaseg evaluation", ""]
    model = (result.get("config") or {}).get("model") or {}
    what = f"{model.get('arch')} / {model.get('encoder')}" if model else "the model"
    if result.get("checkpoint") == "none":
        out.append(f"- model: {what}, random init (`checkpoint=none`), fine-tuned on the k shots")
    elif result.get("checkpoint") is not None:
        step = f" (step {result['step']})" if result.get("step") is not None else ""
        out.append(f"- checkpoint: `{result['checkpoint']}`{step}, {what}")
    if p:
        lr = p['adapt_lr'] if p['adapt_lr'] is not None else "learned"
        out.append(f"- protocol: `{p['mode']}` mode; k in {p['shots']}; {p['episodes']} episodes per k; "
                   f"adaptation: {p['adapt_steps']} SGD step{'' if p['adapt_steps'] == 1 else 's'} at lr {lr}; "
                   f"seed {p['seed']}")
    out.append("- numbers in percent. Zero-shot: one score on every image. k-shot: mean ± 95% CI "
               "(1.96 s/√episodes) over episodes, each adapting on k images and scoring the rest.")
    out.append("- dataset reduction: one confusion matrix over all scored pixels; image reduction: "
               "scores per image, averaged. Classes absent from both prediction and truth are left out of means.")
    if result.get(summary.KEY):  # what training bought: the same episodes and adaptation from a random init
        out += ["", "## Against a random initialisation", "", *summary.section(result)]
    tables = [("mIoU", "miou", "dataset"), ("mF1 (mDice)", "mf1", "dataset"),
              ("mIoU", "miou", "image"), ("mF1 (mDice)", "mf1", "image")]
    binary = result.get("classes") is not None and len(result["classes"]) == 2
    if binary:
        tables += [("foreground IoU", "fg_iou", "dataset"), ("foreground Dice", "fg_dice", "dataset"),
                   ("foreground IoU", "fg_iou", "image"), ("foreground Dice", "fg_dice", "image")]
    for label, metric, reduction in tables:
        out += ["", f"## {label} (%), {reduction} reduction", ""] + _metric_table(results, metric, reduction)
    classes = result.get("classes")
    out += ["", "## Per-class IoU (%), dataset reduction"]
    for name, res in results.datasets.items():
        zero = res.zero_shot.get("iou")
        names = classes or [f"class {c}" for c in range(len(zero))]
        rows = []
        for c, cname in enumerate(names):
            cells = [cname, _cell(zero[c])]
            for k in ks:
                a = res.adapted[k].get("iou") if k in res.adapted else None
                cells.append(_cell(a.mean[c], a.ci95[c]) if a else "–")
            rows.append(cells)
        out += ["", f"### {name}", "", *markdown_table(_header("class", ks), rows, align="lr")]
    out += _curve_tables(results)
    if result.get("pictures"):
        out += ["", "## Pictures", ""] + [f"- {n}: [{path}]({path})" for n, path in result["pictures"].items()]
    return "\n".join(out) + "\n"


CURVE_LABELS = {"miou": "mIoU", "fg_dice": "foreground Dice"}
CURVE_PNG = "curve.png"


def _curves(results: Results) -> dict[str, Curve]:
    return {name: res.curve for name, res in results.datasets.items() if res.curve is not None}


def has_curves(result: dict) -> bool:
    """Whether any dataset of ``result`` has an adaptation curve (``curve.png`` to draw)."""
    return bool(_curves(Results.from_dict(result)))


def _curve_tables(results: Results) -> list[str]:
    """``eval.md``'s adaptation-curve section: one table per dataset, rows k, columns steps."""
    curves = _curves(results)
    if not curves:
        return []
    out = ["", "## Adaptation curve (%), dataset reduction", "",
           f"Score on each episode's query images after S adaptation steps (columns) from k shots (rows), "
           f"mean ± 95% CI over episodes; plotted in [{CURVE_PNG}]({CURVE_PNG})."]
    for name, curve in curves.items():
        steps = list(next(iter(curve.points.values()), {}))
        header = ["k", *[f"{t} step{'' if t == 1 else 's'}" for t in steps]]
        rows = [[f"{k}-shot", *[_estimate_cell(e) for e in by_steps.values()]] for k, by_steps in curve.points.items()]
        out += ["", f"### {name}: {CURVE_LABELS.get(curve.metric, curve.metric)}", "",
                *markdown_table(header, rows, align="lr")]
    return out


def plot_curves(result: dict, path: str | Path) -> None:
    """``curve.png``: metric against adaptation steps, one line per k with its 95% CI shaded, one
    panel per dataset. Steps run over orders of magnitude (0 to 100), so the axis is symmetric-log
    then: linear near 0, where the first steps do most of the work, logarithmic beyond."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    curves = _curves(Results.from_dict(result))
    fig, axes = plt.subplots(1, len(curves), figsize=(4.4 * len(curves), 3.6), squeeze=False)
    for ax, (name, curve) in zip(axes[0], curves.items()):
        steps = []
        for k, by_steps in curve.points.items():
            steps = list(by_steps)
            mean = np.array([_nan(e.mean) for e in by_steps.values()])
            ci = np.array([_nan(e.ci95) for e in by_steps.values()])
            line, = ax.plot(steps, mean, marker="o", label=f"{k}-shot")
            ax.fill_between(steps, mean - ci, mean + ci, color=line.get_color(), alpha=0.2, linewidth=0)
        if steps and max(steps) >= 10:
            ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks(steps, [str(t) for t in steps])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("adaptation steps")
        ax.set_ylabel(CURVE_LABELS.get(curve.metric, curve.metric))
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def _nan(value: Any) -> float:
    """JSON's null (a NaN written out) back to NaN, so matplotlib leaves a gap."""
    return float("nan") if value is None else float(value)


CSV_FIELDS = ("dataset", "setting", "shots", "reduction", "metric", "class", "mean", "ci95", "n")
CSV_METRICS = ("miou", "mf1", "pixel_acc", "fg_iou", "fg_dice", "iou", "f1", "precision", "recall")


def csv_rows(result: dict) -> list[dict]:
    """Every number of ``result`` as long-form rows (fractions); ``ci95``/``n`` empty for zero-shot."""
    classes = result.get("classes")
    rows = []
    for name, res in Results.from_dict(result).datasets.items():
        settings = [("zero_shot", 0, res.zero_shot, None)]
        settings += [("adapted", k, shot, shot.episodes) for k, shot in res.adapted.items()]
        for setting, k, scores, count in settings:
            for reduction in ("dataset", "image"):
                for metric in CSV_METRICS:
                    if not scores.has(metric, reduction):
                        continue
                    value = scores.get(metric, reduction)
                    mean, ci = (value.mean, value.ci95) if isinstance(value, Estimate) else (value, None)
                    per_class = metric in PER_CLASS
                    for c in range(len(mean) if per_class else 1):
                        cname = (classes[c] if classes else str(c)) if per_class else ""
                        rows.append({"dataset": name, "setting": setting, "shots": k, "reduction": reduction,
                                     "metric": metric, "class": cname, "mean": _num(mean[c] if per_class else mean),
                                     "ci95": _num(ci[c] if per_class and ci is not None else ci), "n": count})
    return rows


def csv_report(result: dict) -> str:
    return csv_text(CSV_FIELDS, ([row[f] for f in CSV_FIELDS] for row in csv_rows(result)))


def _write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def write_reports(result: dict, pictures: dict[str, torch.Tensor], run_dir: str | Path) -> dict[str, str]:
    """Write ``pictures/<name>.png``, ``curve.png`` (with a curve), ``eval.csv`` and ``eval.md`` under
    ``run_dir``; returns the picture paths."""
    run_dir = Path(run_dir)
    paths = {}
    for name, grid in pictures.items():
        rel = f"pictures/{name.replace('/', '_').replace(chr(92), '_')}.png"
        save_png(grid, run_dir / rel)
        paths[name] = rel
    result = {**result, "pictures": paths}
    if has_curves(result):
        plot_curves(result, run_dir / CURVE_PNG)
    _write_text(run_dir / "eval.csv", csv_report(result))
    _write_text(run_dir / "eval.md", markdown_report(result))
    return paths
