"""``metaseg-report DIR``: one table (and a plot) for a sweep's runs, best first.

Reads every run folder under ``DIR`` (a Hydra multirun folder: ``DIR/0``, ``DIR/1``, ...; any
folder holding ``metrics.json`` or ``.hydra/overrides.yaml`` counts), takes each run's
overrides from ``.hydra/overrides.yaml`` and its score from ``metrics.json``, and writes
``report.md`` (also printed), ``report.csv`` and ``report.png`` (the metric against each swept
parameter, one panel each) into ``DIR`` (or ``--out``).

The metric is the runs' own ``trainer.best_metric`` (the one their ``best.pt`` and sweep
objective use) unless ``--metric`` names another dotted key of ``metrics.json``. Runs without
``metrics.json`` (crashed, still running) are listed last as ``incomplete``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from metaseg.cli import user_errors
from metaseg.engine.training.best import numeric_leaves
from metaseg.utils.errors import ConfigError, MetasegError
from metaseg.utils.runtime import atomic_write
from metaseg.utils.tables import csv_text as table_csv
from metaseg.utils.tables import markdown_table

PROG = "metaseg-report"
DEFAULT_METRIC, DEFAULT_MODE = "objective", "max"


@dataclass
class Run:
    name: str  # folder, relative to the report's root
    overrides: dict[str, Any] = field(default_factory=dict)  # key -> parsed value
    shown: dict[str, str] = field(default_factory=dict)  # key -> value as written
    metrics: Optional[dict] = None
    config: Optional[dict] = None
    value: float = float("nan")
    status: str = "ok"


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def find_runs(root: Path) -> list[Run]:
    """Every run folder under ``root`` (``root`` itself too), in natural order (2 before 10)."""
    folders = {p.parent for p in root.rglob("metrics.json")}
    folders |= {p.parent.parent for p in root.rglob("overrides.yaml") if p.parent.name == ".hydra"}
    parser = OverridesParser.create()
    runs = []
    for folder in sorted(folders, key=lambda p: _natural(str(p.relative_to(root)))):
        run = Run(name=str(folder.relative_to(root)) if folder != root else ".")
        overrides_file = folder / ".hydra" / "overrides.yaml"
        if overrides_file.is_file():
            lines = [str(x) for x in OmegaConf.to_container(OmegaConf.load(overrides_file))]
            for ov in parser.parse_overrides(lines):
                if ov.is_hydra_override():
                    continue
                run.overrides[ov.key_or_group] = ov.value()
                run.shown[ov.key_or_group] = ov.get_value_element_as_str()
        config_file = folder / ".hydra" / "config.yaml"
        if config_file.is_file():
            run.config = OmegaConf.to_container(OmegaConf.load(config_file), resolve=False)
        metrics_file = folder / "metrics.json"
        if metrics_file.is_file():
            try:
                run.metrics = json.loads(metrics_file.read_text())
            except json.JSONDecodeError as exc:
                raise MetasegError(f"{metrics_file} is not valid JSON ({exc}); delete or re-run that run") from None
        else:
            run.status = "incomplete"
        budget_file = folder / "budget.json"  # wall time, kept out of metrics.json (engine/budget.py)
        if run.metrics is not None and budget_file.is_file():
            try:
                total = json.loads(budget_file.read_text()).get("total") or {}
            except (json.JSONDecodeError, AttributeError) as exc:
                raise MetasegError(f"{budget_file} is not a budget file ({exc}); delete or re-run that run") from None
            seconds = {k: total[k] for k in ("train_seconds", "seconds") if k in total}
            run.metrics.setdefault("budget", {}).update(seconds)
        runs.append(run)
    return runs


def swept_keys(runs: Sequence[Run]) -> list[str]:
    """Override keys whose value is not the same in every run, in order of first appearance."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.shown if k not in keys]
    return [k for k in keys if len({run.shown.get(k) for run in runs}) > 1]


def lookup(tree: Any, name: str) -> Optional[float]:
    """The number at dotted path ``name`` (a ``{mean, ci95}`` summary gives its mean); None if absent."""
    node = tree
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, dict) and "mean" in node:
        node = node["mean"]
    if node is None:
        return float("nan")
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        return None
    return float(node)


def choose_metric(runs: Sequence[Run], metric: Optional[str], mode: Optional[str]) -> tuple[str, str]:
    """``--metric``/``--mode``, else what the runs' configs name as ``trainer.best_metric``/``best_mode``."""
    if metric is None:
        named = {((r.config or {}).get("trainer") or {}).get("best_metric") for r in runs if r.config}
        named.discard(None)
        if len(named) > 1:
            raise ConfigError(f"the runs name different trainer.best_metric values {sorted(named)}; "
                              f"pick one with --metric")
        metric = named.pop() if named else DEFAULT_METRIC
        if mode is None:
            modes = {((r.config or {}).get("trainer") or {}).get("best_mode") for r in runs if r.config} - {None}
            mode = modes.pop() if len(modes) == 1 else DEFAULT_MODE
    return metric, mode or DEFAULT_MODE


def score(runs: Sequence[Run], metric: str, mode: str) -> list[Run]:
    """Attach each run's metric value; return the runs best first, unscored ones last."""
    complete = [r for r in runs if r.metrics is not None]
    if complete and all(lookup(r.metrics, metric) is None for r in complete):
        available = [k for k in numeric_leaves(complete[0].metrics) if not k.startswith("datasets.")]
        available = ", ".join(available + ["datasets.<name>.zero_shot.miou", "..."])
        raise ConfigError(f"--metric {metric!r} is in no run's metrics.json; available: {available}")
    for run in complete:
        value = lookup(run.metrics, metric)
        run.value = float("nan") if value is None else value
        if value is None or math.isnan(value):
            run.status = "no metric"
    sign = -1.0 if mode == "max" else 1.0
    return sorted(runs, key=lambda r: (math.isnan(r.value), sign * r.value if not math.isnan(r.value) else 0.0))


def extra_columns(runs: Sequence[Run], metric: str) -> list[str]:
    """The other summary numbers every report shows: ``mean.*`` of metrics.json and the best value."""
    keys: list[str] = []
    for run in runs:
        for key, value in ((run.metrics or {}).get("mean") or {}).items():
            name = f"mean.{key}"
            if name != metric and name not in keys and isinstance(value, (int, float)):
                keys.append(name)
    for run in runs:  # both budget views: images processed and wall time
        for key in ("forward_images", "backward_images", "train_seconds", "seconds"):
            name = f"budget.{key}"
            if name not in keys and key in ((run.metrics or {}).get("budget") or {}):
                keys.append(name)
    return keys


def table(runs: Sequence[Run], metric: str, mode: str) -> tuple[list[str], list[list[Any]]]:
    swept = swept_keys(runs)
    extras = extra_columns(runs, metric)
    header = ["rank", "run", *swept, metric, "best", "best_step", *extras, "status"]
    rows = []
    for rank, run in enumerate(runs, 1):
        best = (run.metrics or {}).get("best") or {}
        rows.append([rank if run.status == "ok" else "", run.name, *[run.shown.get(k, "") for k in swept],
                     run.value, best.get("value"), best.get("step"),
                     *[lookup(run.metrics or {}, k) for k in extras], run.status])
    return header, rows


def _cell(value: Any) -> str:
    """Markdown cell: scores to 4 decimals, long sampled values (Optuna's) to 4 significant digits."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    text = str(value)
    if len(text) > 8:
        try:
            return f"{float(text):.4g}"
        except ValueError:
            pass
    return text


def markdown(root: Path, runs: Sequence[Run], metric: str, mode: str) -> str:
    header, rows = table(runs, metric, mode)
    done = sum(r.status == "ok" for r in runs)
    lines = [f"# Sweep report: {root.name}", "",
             f"{len(runs)} runs ({done} scored), sorted by `{metric}` ({'higher' if mode == 'max' else 'lower'} "
             f"is better); `best` is the best `{metric}` a run reached at an evaluation during training.", "",
             *markdown_table(header, [[_cell(v) for v in row] for row in rows])]
    swept = swept_keys(runs)
    if swept:
        lines += ["", f"Swept: {', '.join(f'`{k}`' for k in swept)}."]
    lines += ["", "![metric against each swept parameter](report.png)", ""]
    return "\n".join(lines)


def csv_text(runs: Sequence[Run], metric: str, mode: str) -> str:
    return table_csv(*table(runs, metric, mode))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plot(path: Path, runs: Sequence[Run], metric: str, mode: str) -> None:
    """``metric`` against each swept parameter: every run a dot, the best per value joined by a line."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in runs if not math.isnan(r.value)]
    swept = swept_keys(runs) or [None]
    fig, axes = plt.subplots(1, len(swept), figsize=(4.2 * len(swept), 3.6), squeeze=False)
    pick = max if mode == "max" else min
    for ax, key in zip(axes[0], swept):
        if key is None:  # nothing swept: one bar per run
            ax.bar(range(len(scored)), [r.value for r in scored], color="tab:blue")
            ax.set_xticks(range(len(scored)), [r.name for r in scored], rotation=45, ha="right")
            ax.set_xlabel("run")
        else:
            values = [r.overrides.get(key) for r in scored]
            numeric = bool(values) and all(_is_number(v) for v in values)
            if numeric:
                xs = [float(v) for v in values]
                positive = all(x > 0 for x in xs)
                if positive and max(xs) / min(xs) >= 10:
                    ax.set_xscale("log")
                ticks = sorted(set(xs))
            else:
                labels = sorted({scored_run.shown.get(key, "") for scored_run in scored})
                xs = [float(labels.index(r.shown.get(key, ""))) for r in scored]
                ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
                ticks = sorted(set(xs))
            ax.scatter(xs, [r.value for r in scored], color="tab:blue", alpha=0.7, label="run")
            best = [pick(r.value for r, x in zip(scored, xs) if x == t) for t in ticks]
            ax.plot(ticks, best, color="tab:orange", marker="o", label=f"{mode} per value")
            if numeric:  # label ticks as the overrides wrote them (1, not 1.0)
                label = {float(r.overrides.get(key)): r.shown.get(key, "") for r in scored}
                ax.set_xticks(ticks, [label[t] for t in ticks])
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel(key)
            ax.legend(fontsize=7)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metric} ({len(scored)} runs)", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def report(root: str | Path, metric: Optional[str] = None, mode: Optional[str] = None,
           out: Optional[str | Path] = None) -> dict:
    """Write report.md, report.csv and report.png for the runs under ``root``; returns what it found."""
    root = Path(root)
    if not root.is_dir():
        raise MetasegError(f"{root} is not a folder; pass a multirun folder (outputs/multirun/DATE/TIME)")
    if mode is not None and mode not in ("max", "min"):
        raise ConfigError(f"--mode {mode!r} is not one of max, min")
    runs = find_runs(root)
    if not runs:
        raise MetasegError(f"no runs under {root}: a run folder holds metrics.json or .hydra/overrides.yaml")
    metric, mode = choose_metric(runs, metric, mode)
    runs = score(runs, metric, mode)
    out = Path(out) if out is not None else root
    md = markdown(root, runs, metric, mode)
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(md))
    text = csv_text(runs, metric, mode)
    atomic_write(out / "report.csv", lambda tmp: Path(tmp).write_text(text))
    plot(out / "report.png", runs, metric, mode)
    return {"metric": metric, "mode": mode, "runs": runs, "markdown": md,
            "files": [out / "report.md", out / "report.csv", out / "report.png"]}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example: metaseg-report outputs/multirun/2026-11-28/10-00-00")
    parser.add_argument("dir", help="a multirun folder (or any folder holding run folders)")
    parser.add_argument("--metric", help="dotted key of metrics.json to sort by (default: the runs' "
                                         "trainer.best_metric, e.g. mean.adapted_miou)")
    parser.add_argument("--mode", choices=("max", "min"), help="max: higher is better (default: the runs' "
                                                               "trainer.best_mode)")
    parser.add_argument("--out", help="folder for report.md/.csv/.png (default: DIR)")
    args = parser.parse_args(argv)
    with user_errors(PROG):
        result = report(args.dir, args.metric, args.mode, args.out)
    print(result["markdown"])
    print("wrote " + ", ".join(str(f) for f in result["files"]))


if __name__ == "__main__":
    main()
