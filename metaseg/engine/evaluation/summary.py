"""The one screen a run ends with: the held-out scores beside the random-init baseline, then where to look.

A score alone ("5-shot mIoU 26.4") does not say whether training helped; beside it the same
episodes adapted from a random initialisation of the same model (``metaseg.engine.evaluation.baseline``)
do. For each held-out dataset and setting (zero-shot, every k) the table gives both, their
difference with the 95% interval of the per-episode differences (both models score the same
seeded episodes, so the comparison is paired), and whether that interval excludes 0. Zero-shot
scores are one number on every image, with no interval to compare. The headline metric is
foreground Dice for a binary label space (what vessel, polyp and lesion papers quote) and mIoU
otherwise, both the dataset reduction. :func:`paired_difference` is the one paired comparison
of the project: the study script takes its differences between arms with it too.

One section serves the console (``metaseg-train`` and ``metaseg-eval`` log it last) and
``eval.md``: a Markdown table with padded columns (``metaseg.utils.tables``) reads as well in a
terminal as rendered.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from metaseg.engine.evaluation.results import Estimate, Results, ShotResult
from metaseg.metrics import mean_ci95
from metaseg.utils.tables import markdown_table

KEY = "baseline"  # the random-init baseline's entry in eval.json and metrics.json (metaseg.engine.evaluation.baseline)
RANDOM = "random init"  # its name in the table and the log
METRIC_NAMES = {"miou": "mIoU", "fg_dice": "foreground Dice"}
CONTROL = ("The random init is the weak control (did training help at all?); joint training on the same "
           "data (meta=erm) is the strong one.")


@dataclass(frozen=True)
class Row:
    """One (dataset, setting) of the table; scores are fractions, intervals 95% half-widths (None: none)."""

    dataset: str
    setting: str  # zero-shot | k-shot
    trained: Optional[float]
    trained_ci: Optional[float] = None
    random: Optional[float] = None
    random_ci: Optional[float] = None
    paired_ci: Optional[float] = None  # 95% half-width of the per-episode differences (same episodes)

    @property
    def difference(self) -> Optional[float]:
        if self.trained is None or self.random is None:
            return None
        return self.trained - self.random

    @property
    def beyond_cis(self) -> Optional[bool]:
        """The paired interval of the difference excludes 0; without per-episode scores, the
        difference exceeds both intervals added (they do not overlap). None without intervals."""
        d = self.difference
        if d is not None and self.paired_ci is not None:
            return abs(d) > self.paired_ci
        if d is None or self.trained_ci is None or self.random_ci is None:
            return None
        return abs(d) > self.trained_ci + self.random_ci


def paired_difference(x: Sequence[float], y: Sequence[float]) -> Optional[Estimate]:
    """Mean and 95% interval of ``x - y`` value by value: two models' (or two step counts') scores on
    the same seeded episodes. The spread the episodes share (an easy or a hard query image) cancels,
    which two separate intervals would count twice. None without values, or with unequal counts."""
    if not x or not y or len(x) != len(y):
        return None
    m = mean_ci95([u - v for u, v in zip(x, y)])
    return Estimate(m["mean"], m["ci95"])


def paired_interval(a: ShotResult, b: ShotResult, metric: str) -> Optional[float]:
    """The 95% half-width of ``a - b`` episode by episode, where both scored the same episodes
    (the same supports, so the same seeded queries). None without per-episode scores, or with
    fewer than two episodes (a zero-width interval says nothing)."""
    if len(a.per_episode) < 2 or a.supports != b.supports:
        return None
    d = paired_difference(a.values(metric), b.values(metric))
    return None if d is None else _num(d.ci95)


def _num(value: Any) -> Optional[float]:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _interval(shot: ShotResult, metric: str) -> Optional[float]:
    """The 95% half-width, or None where it says nothing (fewer than two episodes)."""
    return _num(shot.get(metric).ci95) if (shot.episodes or 0) >= 2 else None


def headline_metric(result: dict) -> str:
    """``fg_dice`` where the label space is binary (its scores carry the foreground's), else ``miou``."""
    scores = [res.zero_shot for res in Results.from_dict(result).datasets.values()]
    return "fg_dice" if scores and all(s.has("fg_dice") for s in scores) else "miou"


def shots(result: dict) -> list[int]:
    """The k of the result's episodes, in the order they were run."""
    return Results.from_dict(result).shots


def rows(result: dict) -> list[Row]:
    """The table's rows: per held-out dataset, zero-shot then every k, with the baseline where present."""
    metric, trained = headline_metric(result), Results.from_dict(result)
    base = Results.from_dict(result.get(KEY)).datasets
    ks = trained.shots
    out = []
    for name, res in trained.datasets.items():
        other = base.get(name)
        out.append(Row(name, "zero-shot", _num(res.zero_shot.get(metric)),
                       random=_num(other.zero_shot.get(metric)) if other else None))
        for k in ks:
            a = res.adapted.get(k)
            b = other.adapted.get(k) if other else None
            if a is None:
                continue
            out.append(Row(name, f"{k}-shot", _num(a.get(metric).mean), _interval(a, metric),
                           _num(b.get(metric).mean) if b else None, _interval(b, metric) if b else None,
                           paired_interval(a, b, metric) if b else None))
    return out


def _pct(value: Optional[float], ci: Optional[float] = None) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}" if ci is None else f"{100 * value:.1f} ± {100 * ci:.1f}"


def _yes_no(flag: Optional[bool]) -> str:
    return "–" if flag is None else ("yes" if flag else "no")


def table(result: dict, model: str = "trained") -> list[str]:
    """The Markdown table, columns padded; ``model`` heads the scored model's column. Without a
    baseline (``eval.baseline=false``, or the model is the random init) only that column."""
    with_base = bool(result.get(KEY))
    head = ["dataset", "setting", model] + ([RANDOM, "difference", "beyond CIs"] if with_base else [])
    body = []
    for r in rows(result):
        cells = [r.dataset, r.setting, _pct(r.trained, r.trained_ci)]
        if with_base:
            d, ci = r.difference, r.paired_ci
            diff = "–" if d is None else f"{100 * d:+.1f}" + ("" if ci is None else f" ± {100 * ci:.1f}")
            cells += [_pct(r.random, r.random_ci), diff, _yes_no(r.beyond_cis)]
        body.append(cells)
    return markdown_table(head, body, align="llr", pad=True)


def adaptation(result: dict) -> str:
    """How the k-shot columns adapted, in words: "3 steps at lr 0.1"."""
    for res in Results.from_dict(result).datasets.values():
        a = res.first
        if a:
            steps, lr = a.adapt_steps, a.adapt_lr
            return (f"{steps} step{'' if steps == 1 else 's'} at "
                    f"{'the learned step sizes' if lr is None else f'lr {lr:g}'}")
    return "no adaptation (zero-shot only)"


def caption(result: dict, model: str = "trained") -> list[str]:
    """The lines above the table: metric, what is compared, and how."""
    what = METRIC_NAMES.get(headline_metric(result), headline_metric(result))
    episodes = (result.get("protocol") or {}).get("episodes")
    over = f"; k-shot: mean ± 95% CI over {episodes} episodes" if episodes and shots(result) else ""
    out = [f"Held-out {what} (%){over}; adaptation: {adaptation(result)}."]
    base = result.get(KEY)
    if base:
        weights = "" if base["init"] == "random" else f" ({base['init']})"
        out.append(f"{RANDOM}: the same model from a random initialisation{weights} (seed {base['seed']}), "
                   f"adapted on the same episodes in the same way.")
    return out


def notes(result: dict) -> list[str]:
    """What the columns mean, under the table."""
    if not result.get(KEY):
        return []
    return ["difference: trained minus random init, in points, ± the 95% interval of the per-episode differences "
            "(both score the same episodes); beyond CIs: that interval excludes 0.", CONTROL]


def section(result: dict, model: str = "trained") -> list[str]:
    """Caption, table and notes: ``eval.md``'s comparison and the top of the console summary."""
    if not result.get("datasets"):
        return ["No held-out datasets were scored (data.heldout is empty)."]
    return [*caption(result, model), "", *table(result, model), "", *notes(result)]


def render(result: dict, where: Sequence[tuple[str, str]], model: str = "trained",
           reason: Optional[str] = None) -> str:
    """The console summary: the section, why there is no baseline (``reason``), then ``where``
    (label, what to run or open) to look next."""
    out = ["", "=" * 20 + " summary " + "=" * 20, *section(result, model)]
    if reason:
        out += ["", reason]
    width = max((len(label) for label, _ in where), default=0)
    out += ["", "Where to look next:", *[f"  {label.ljust(width)}  {text}" for label, text in where]]
    return "\n".join(line.rstrip() for line in out)


def shown_path(path: str | os.PathLike) -> str:
    """``path`` as a user would type it here: relative to the working folder when inside it."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
