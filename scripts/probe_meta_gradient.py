#!/usr/bin/env python
"""How far can the outer step trust the second-order meta-gradient? A probe of one config.

For a few tasks of a composed ``metaseg-train`` config, at the initial weights theta:

* ``|g2|``, ``|g1|``: norms of the exact (second-order) MAML meta-gradient and of the
  first-order one (the query gradient at the adapted weights), and their cosine;
* for the last task, the directional derivative of the adapted query loss along ``g2``,
  measured by central finite differences at step sizes ``eps`` (in parameter space), against
  ``|g2|``. The *valid radius* is the largest ``eps`` up to which the two agree within 10%:
  beyond it the loss the outer optimizer descends is not the one its gradient describes.
  Adam's first steps move each weight by about beta (1e-3), far beyond a radius of 1e-7.

Run it in float64 (``--float64``) so the differences measure the function, not rounding.

    python scripts/probe_meta_gradient.py --float64 -- experiment=lodo data.heldout=[retina_stare] \\
        data.root=../shared/data
    python scripts/probe_meta_gradient.py --float64 -- experiment=lodo data.heldout=[retina_stare] \\
        data.root=../shared/data model.smooth=true
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Sequence

import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf
from torch.nn.utils import parameters_to_vector

import metaseg.config  # noqa: F401 - registers the schemas
from metaseg.data.tasks import Task
from metaseg.engine.training.setup import build_run
from metaseg.meta.from_config import make_learner
from metaseg.meta.precision import Precision

EPS = [1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--tasks", type=int, default=6, help="tasks whose meta-gradients are compared (default: %(default)s)")
    p.add_argument("--float64", action="store_true", help="model and images in float64 (finite differences need it)")
    p.add_argument("--eps", type=float, nargs="+", default=EPS, help="finite-difference steps (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the train config (after --)")
    return p.parse_args(argv)


def as_dtype(task: Task, dtype: torch.dtype) -> Task:
    """``task`` with its images in ``dtype`` (the masks stay class indices)."""
    return Task(task.dataset, (task.support[0].to(dtype), task.support[1]), (task.query[0].to(dtype), task.query[1]),
                task.query_dataset)


def meta_gradient(learner, task: Task) -> tuple[float, list[torch.Tensor]]:
    """The task's adapted query loss and its gradient with respect to theta (None entries: zeros)."""
    params = list(learner.model.parameters())
    learner.model.zero_grad(set_to_none=True)
    loss = learner.outer_loss(task.support, task.query)
    loss.backward()
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    learner.model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def directional_slopes(learner, task: Task, direction: Sequence[torch.Tensor], eps: Sequence[float]) -> list[float]:
    """Central differences of the adapted query loss along the unit vector ``direction`` at each ``eps``."""
    params = list(learner.model.parameters())
    norm = math.sqrt(sum(float(d.pow(2).sum()) for d in direction))
    base = [p.detach().clone() for p in params]

    def loss_at(step: float) -> float:
        with torch.no_grad():
            for p, b, d in zip(params, base, direction):
                p.copy_(b + d * (step / norm))
        return float(learner.outer_loss(task.support, task.query).detach())

    try:
        return [(loss_at(e) - loss_at(-e)) / (2 * e) for e in eps]
    finally:
        with torch.no_grad():
            for p, b in zip(params, base):
                p.copy_(b)


def valid_radius(eps: Sequence[float], slopes: Sequence[float], expected: float, tolerance: float = 0.1) -> float:
    """Largest ``eps`` (ascending) up to which every slope is within ``tolerance`` of ``expected``; 0 if none."""
    radius = 0.0
    for e, s in sorted(zip(eps, slopes)):
        if abs(s - expected) > tolerance * abs(expected):
            break
        radius = e
    return radius


def setup(cfg: DictConfig, dtype: torch.dtype):
    """The config's task sampler, its learner as ``metaseg-train`` builds it (``build_run``), and a
    first-order twin of that learner on the same model (in ``dtype``)."""
    run = build_run(cfg)
    run.model.to(dtype)
    first = make_learner(run.model, OmegaConf.merge(cfg.meta, {"first_order": True}), Precision("32", "cpu"))
    return run.sampler, run.learner, first


def probe(cfg: DictConfig, tasks: int, eps: Sequence[float], dtype: torch.dtype = torch.float32) -> dict:
    sampler, second, first = setup(cfg, dtype)
    rows = []
    for i in range(tasks):
        t = as_dtype(sampler.sample(), dtype)
        loss, g2 = meta_gradient(second, t)
        _, g1 = meta_gradient(first, t)
        a, b = parameters_to_vector(g2), parameters_to_vector(g1)
        rows.append({"dataset": t.dataset, "loss": loss, "g2": float(a.norm()), "g1": float(b.norm()),
                     "ratio": float(a.norm() / b.norm()), "cos": float(torch.nn.functional.cosine_similarity(a, b, 0))})
        print(f"task {i} {t.dataset}: |g2| {rows[-1]['g2']:.4g}  |g1| {rows[-1]['g1']:.4g}  "
              f"ratio {rows[-1]['ratio']:.1f}  cos {rows[-1]['cos']:+.3f}", flush=True)
    slopes = directional_slopes(second, t, g2, eps)
    for e, s in zip(eps, slopes):
        print(f"  eps {e:g}: finite-difference slope {s:.4g}  (|g2| {rows[-1]['g2']:.4g})", flush=True)
    radius = valid_radius(eps, slopes, rows[-1]["g2"])
    summary = {"median_ratio": statistics.median(r["ratio"] for r in rows),
               "median_cos": statistics.median(r["cos"] for r in rows), "valid_radius": radius}
    print(f"median |g2|/|g1| {summary['median_ratio']:.1f}, median cos {summary['median_cos']:+.3f}, "
          f"valid radius {radius:g}", flush=True)
    return {"tasks": rows, "eps": list(eps), "slopes": slopes, **summary}


def main(argv=None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    with initialize_config_module(config_module="metaseg.conf", version_base="1.3"):
        cfg = compose("train", args.overrides)
    out = probe(cfg, args.tasks, args.eps, torch.float64 if args.float64 else torch.float32)
    out["overrides"] = args.overrides
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
