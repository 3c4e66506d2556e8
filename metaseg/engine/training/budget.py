"""Budget accounting: images through the model's forward and backward passes, and wall time.

Arms of a comparison differ in what one outer step costs (second-order MAML backpropagates
through its inner loop; ERM does not adapt at all), so equal step counts are not equal
budgets. A run counts, during its outer steps only (not evaluation, monitoring or probes):

* ``forward_images``: images in every forward pass of the whole model (support and query
  batches, the logged query loss before adaptation, every inner step);
* ``backward_images``: images of every forward pass whose output a backward pass went
  through, once per time it did: a first-order inner step counts its support batch once,
  a second-order outer step counts the support batches of its inner loop again (the
  gradient goes back through their graph a second time);
* ``train_seconds``: wall time inside the outer steps; ``seconds``: the whole run, from the
  first step to the last checkpoint, over every process that worked on it (a run killed and
  resumed adds each sitting's time up to the checkpoint it was resumed from; the work redone
  after that checkpoint is not counted twice). A checkpoint written before ``seconds`` was
  kept in it holds only ``train_seconds``, which then stands in for its earlier sittings.

Forward passes are seen by a global module forward hook that fires for the model and for
higher's patched copy of it (``Functional<Arch>``); backward passes by a tensor hook on
each counted output. The counts are plain numbers in the run's checkpoint, so a resumed run
keeps counting; they go to ``metrics.json`` (the seed determines them) and, with the times,
to ``budget.json``. A two-stage run (``pretrain.steps``) adds its first stage's budget.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

from metaseg.utils.runtime import write_json

FILE = "budget.json"
COUNTS = ("forward_images", "backward_images", "outer_steps")


class Budget:
    """Counts images through ``model`` (or higher's copy of it) while :meth:`counting`."""

    def __init__(self, model: nn.Module):
        name = type(model).__name__
        self.names = {name, "InnerFunctional" + name, "Functional" + name}  # higher names its copies so
        self.forward_images = 0
        self.backward_images = 0
        self.outer_steps = 0
        self.train_seconds = 0.0
        self.earlier_seconds = 0.0  # wall time of the sittings before this process (from the checkpoint)
        self._started: Optional[float] = None

    def _forward(self, module: nn.Module, inputs, output) -> None:
        if type(module).__name__ not in self.names or not inputs or not torch.is_tensor(inputs[0]):
            return
        n = int(inputs[0].shape[0])
        self.forward_images += n
        if torch.is_tensor(output) and output.requires_grad:
            output.register_hook(lambda grad, n=n: self._backward(n))

    def _backward(self, n: int) -> None:
        self.backward_images += n

    @contextmanager
    def counting(self):
        """Count inside this block (one outer step)."""
        handle = torch.nn.modules.module.register_module_forward_hook(self._forward)
        t0 = time.perf_counter()
        try:
            yield self
        finally:
            handle.remove()
            self.train_seconds += time.perf_counter() - t0
            self.outer_steps += 1

    def start_clock(self) -> None:
        """This process starts its share of the run's wall time (``seconds``) now."""
        self._started = time.perf_counter()

    @property
    def seconds(self) -> float:
        """The whole run's wall time so far: earlier sittings' plus this process's since :meth:`start_clock`."""
        own = time.perf_counter() - self._started if self._started is not None else 0.0
        return self.earlier_seconds + own

    def counts(self) -> dict:
        return {key: int(getattr(self, key)) for key in COUNTS}

    def state_dict(self) -> dict:
        return {**self.counts(), "train_seconds": float(self.train_seconds), "seconds": float(self.seconds)}

    def load_state_dict(self, state: Mapping) -> None:
        for key in COUNTS:
            setattr(self, key, int(state.get(key, 0)))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.earlier_seconds = float(state.get("seconds", self.train_seconds))


def read_budget(run_dir: Path) -> Optional[dict]:
    path = Path(run_dir) / FILE
    return json.loads(path.read_text()) if path.is_file() else None


def run_budget(budget: Budget, seconds: float, stages: Optional[dict] = None) -> dict:
    """``budget.json``: this run's counts and times, plus earlier stages' and the totals."""
    own = {**budget.counts(), "train_seconds": budget.train_seconds, "seconds": seconds}
    out = {"this_stage": own}
    if stages:
        out["stages"] = stages
    parts = [own, *[s.get("total", s) for s in (stages or {}).values()]]
    out["total"] = {key: sum(p.get(key, 0) for p in parts) for key in (*COUNTS, "train_seconds", "seconds")}
    return out


def write_budget(run_dir: Path, budget: Budget, seconds: float, stage_dirs: Mapping[str, Path] = {}) -> dict:
    stages = {name: read_budget(d) for name, d in stage_dirs.items()}
    out = run_budget(budget, seconds, {k: v for k, v in stages.items() if v})
    write_json(Path(run_dir) / FILE, out)
    return out
