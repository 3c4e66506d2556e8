"""Which checkpoint is best: one named metric of the held-out result, maximised or minimised.

The metric is a dotted path into the evaluation result (the structure of ``metrics.json``),
``mean.adapted_miou`` by default; ``trainer.best_metric`` names another (a validation metric,
a single dataset's score). The tracker is a stateful object of the run, so a resumed run
keeps comparing against the best value seen before the interruption.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

from metaseg.data.pairs import few
from metaseg.utils.errors import ConfigError

MODES = ("max", "min")


def numeric_leaves(tree: Any, prefix: str = "") -> dict[str, float]:
    """Dotted paths of every number in nested dicts (lists skipped): what a metric name can be."""
    out: dict[str, float] = {}
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            out.update(numeric_leaves(value, f"{prefix}{key}."))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        out[prefix[:-1]] = float(tree)
    return out


def metric_value(result: Mapping, name: str, key: str = "trainer.best_metric") -> float:
    """The number at dotted path ``name`` of ``result``; a wrong name lists the available ones."""
    node: Any = result
    for part in name.split("."):
        if not isinstance(node, Mapping) or part not in node:
            leaves = [k for k in numeric_leaves(result) if not k.startswith("classes")]
            leaves.sort(key=lambda k: not k.startswith(("mean.", "val.mean.")))  # the means first: what one picks
            available = few(leaves, 12) if leaves else "none"
            raise ConfigError(f"{key}={name!r} is not in the evaluation result; available: {available}")
        node = node[part]
    if node is None:
        return float("nan")
    if isinstance(node, Mapping) and "mean" in node:  # {"mean": ..., "ci95": ...} summaries
        node = node["mean"]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise ConfigError(f"{key}={name!r} names a {type(node).__name__}, not a number; name a leaf such as "
                          f"{name}.<key>")
    return float(node)


class BestTracker:
    """Remembers the best value of one metric and the step it was reached at."""

    def __init__(self, metric: str, mode: str = "max"):
        if mode not in MODES:
            raise ConfigError(f"trainer.best_mode={mode!r} is not one of {', '.join(MODES)}")
        self.metric, self.mode = metric, mode
        self.value: Optional[float] = None
        self.step: Optional[int] = None

    def is_better(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.value is None:
            return True
        return value > self.value if self.mode == "max" else value < self.value

    def value_of(self, result: Mapping) -> float:
        return metric_value(result, self.metric)

    def update(self, result: Mapping, step: int) -> bool:
        """Read the metric from ``result``; True (and remembered) when it beats the best so far."""
        value = metric_value(result, self.metric)
        if not self.is_better(value):
            return False
        self.value, self.step = value, int(step)
        return True

    def summary(self) -> dict:
        return {"metric": self.metric, "mode": self.mode, "value": self.value, "step": self.step}

    def state_dict(self) -> dict:
        return self.summary()

    def load_state_dict(self, state: Mapping) -> None:
        self.value = None if state.get("value") is None else float(state["value"])
        self.step = None if state.get("step") is None else int(state["step"])
