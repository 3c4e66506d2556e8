#!/usr/bin/env python
"""Seconds and peak memory of one meta-step, per algorithm and backend, against two floors.

Every configuration runs one outer step on the same model (same initial weights), the same
task (SHOTS support + QUERY query images of the synthetic mix, rendered at SIZE px) and the
same K:

  plain          K+1 ordinary SGD training steps (K on the support batch, 1 on the query):
                 the floor of any meta-step.
  raw_higher     MAML written with higher's own ``innerloop_ctx`` and ``DifferentiableOptimizer``
                 in this script, second order, Adam outer step: the floor of the higher backend.
  raw_higher_fo  the same loop first order (``track_higher_grads=False``, the query gradient at
                 the adapted weights applied to theta): the floor of first order.
  raw_func       MAML hand-written on ``torch.func.functional_call`` and
                 ``autograd.grad(create_graph=True)``, Adam outer step (the peers' fastest
                 second-order loop among the peers we compared): the floor of the func backend.
  ALGO/BACKEND   the project's own ``ALGORITHMS[ALGO](..., backend=BACKEND).meta_step``
                 with one task per step (maml, fomaml, anil: ANIL adapts the last decoder
                 block and the head, its default, and reuses the frozen modules' outputs;
                 imaml on request: K proximal steps without a graph, then --cg-steps
                 Hessian-vector products at --imaml-lambda and --cg-damping).
  maml/BACKEND+ckpt  with ``--checkpoint-inner``: MAML with meta.checkpoint_inner=true.

Time: one warm-up step of every configuration, then REPS rounds in which every
configuration runs one step (round-robin, so load drift hits them all alike); the median
per configuration, as a ratio to plain's median and to the raw higher loop's (first-order
configurations to raw_higher_fo). Memory: each configuration again in a fresh subprocess
(``--memory-of``), two steps, peak resident set size (on CPU, the whole process, like the
peers' tables: ``VmHWM`` of ``/proc/self/status``, else ``getrusage`` maxrss) or ``torch.cuda.max_memory_allocated``
(CUDA); ratio to plain's. Below the table, the step-cost targets with the measured value.

``--grid`` prints the cost-growth table instead: for every image size of ``--grid-sizes``
and K of ``--grid-k``, plain and every ALGO/BACKEND (one warm-up step, REPS timed steps,
peak memory); one fresh subprocess per configuration and size runs its K values in
increasing order (its high-water mark at K is the peak at K: memory does not shrink as K
grows). A cell that fails (a large K out of memory) is reported as such, and its smaller K
values and the other cells are kept. ``--checkpoint-inner`` adds MAML with the memory saver.
Below the table, each configuration's growth from the smallest to the largest K: peak memory
and time at the largest K over those at the smallest (second-order MAML grows about linearly
in K; iMAML's memory should stay flat).

``--data-path`` times the data path instead: a meta-step drawing its task from the real
loader (``data=binary_mix``, images under ``--data-root``, augmentation on) against the
same step on the same tasks preloaded as tensors, interleaved; it prints the fraction the
loader adds and the time ``TaskSampler.sample`` takes alone.

    # the step-cost setting (2 threads, Unet-resnet18 at full depth, 128 px, 4+4, K=5)
    python scripts/bench_meta_step.py --threads 2 --size 128 --inner-steps 5 --reps 10
    python scripts/bench_meta_step.py --grid --threads 2 --backends func --reps 1
    python scripts/bench_meta_step.py --data-path --threads 2 --size 128 --reps 8
    # iMAML's memory against second-order MAML's as K grows (docs/algorithms.md)
    python scripts/bench_meta_step.py --grid --grid-sizes 128 --grid-k 5 20 50 --algorithms maml imaml \
        --backends func --threads 2 --reps 3
    # a quick look: small model, small images
    python scripts/bench_meta_step.py --depth 3 --size 64 --inner-steps 2 --reps 2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from metaseg.config import ModelConfig
from metaseg.data.synthetic import CLASSES, synthetic_task
from metaseg.data.tasks import Task
from metaseg.meta import ALGORITHMS as ZOO
from metaseg.meta import OuterSettings, Precision, pixel_cross_entropy
from metaseg.meta.inner import full_precision
from metaseg.models.factory import build_model
from metaseg.utils.tables import markdown_table

ALGORITHMS = ("maml", "fomaml", "anil")  # the default set
CHOICES = (*ALGORITHMS, "imaml")
BACKENDS = ("higher", "func")
FIRST_ORDER = ("fomaml", "raw_higher_fo")
DEFAULT_DECODER = (256, 128, 64, 32, 16)  # smp's Unet default, trimmed to --depth entries


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and task")
    g.add_argument("--arch", default="Unet", help="smp architecture (default: %(default)s)")
    g.add_argument("--encoder", default="resnet18", help="smp encoder (default: %(default)s)")
    g.add_argument("--depth", type=int, default=5,
                   help="encoder_depth; the decoder is smp's default (256,128,64,32,16) cut to this many "
                        "blocks (default: %(default)s, the full U-Net)")
    g.add_argument("--size", type=int, default=128, help="image side in pixels (default: %(default)s)")
    g.add_argument("--shots", type=int, default=4, help="support images per task (default: %(default)s)")
    g.add_argument("--query", type=int, default=4, help="query images per task (default: %(default)s)")
    g.add_argument("--inner-steps", "-k", type=int, default=5, help="K, inner SGD steps (default: %(default)s)")
    g.add_argument("--inner-lr", type=float, default=0.01, help="alpha, also plain's SGD rate (default: %(default)s)")
    g.add_argument("--outer-lr", type=float, default=1e-3, help="beta, Adam (default: %(default)s)")
    g.add_argument("--imaml-lambda", type=float, default=2.0, help="imaml: lambda, the proximal strength "
                                                                      "(default: %(default)s)")
    g.add_argument("--cg-steps", type=int, default=5, help="imaml: CG iterations (default: %(default)s)")
    g.add_argument("--cg-damping", type=float, default=0.0, help="imaml: CG damping (default: %(default)s)")
    g = p.add_argument_group("what to run")
    g.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=CHOICES,
                   help="project algorithms to time (default: %(default)s)")
    g.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS,
                   help="inner-loop backends (default: %(default)s)")
    g.add_argument("--checkpoint-inner", action="store_true",
                   help="also time MAML with meta.checkpoint_inner=true (the second-order memory saver)")
    g.add_argument("--no-floors", action="store_true", help="skip the raw higher loops (plain always runs)")
    g.add_argument("--reps", type=int, default=5, help="timed rounds after the warm-up (default: %(default)s)")
    g.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    g.add_argument("--precision", default="32", choices=["32", "bf16", "16"],
                   help="32, bf16 or 16 (fp16) autocast for every configuration (default: %(default)s)")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--seed", type=int, default=0, help="weights, task and sampler seed (default: %(default)s)")
    g.add_argument("--json", type=Path, help="also write the rows here")
    g = p.add_argument_group("modes")
    g.add_argument("--grid", action="store_true", help="the cost-growth table (sizes x K), see above")
    g.add_argument("--grid-sizes", nargs="+", type=int, default=[64, 128, 256], help="(default: %(default)s)")
    g.add_argument("--grid-k", nargs="+", type=int, default=[1, 2, 5, 10], help="(default: %(default)s)")
    g.add_argument("--data-path", action="store_true", help="real loader against preloaded tensors, see above")
    g.add_argument("--data-root", default="../shared/data",
                   help="folder of the binary_mix datasets, relative to the working directory (default: %(default)s)")
    g.add_argument("--data-algorithm", default="maml", choices=CHOICES,
                   help="algorithm of the data-path step, on the first of --backends (default: %(default)s)")
    g.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: one configuration's peak memory
    g.add_argument("--cell", help=argparse.SUPPRESS)  # internal: one grid cell, time and memory
    a = p.parse_args(argv)
    if a.depth < 1 or a.depth > len(DEFAULT_DECODER):
        p.error(f"--depth must be in 1..{len(DEFAULT_DECODER)}")
    if min(a.size, a.shots, a.query, a.reps) < 1 or a.inner_steps < 0:
        p.error("--size, --shots, --query and --reps must be >= 1, --inner-steps >= 0")
    return a


# -- one step of each configuration ---------------------------------------------------
class Fixed:
    """A task sampler that always returns the same task (``meta_step`` calls ``sample()``)."""

    def __init__(self, task: Task):
        self.task = task

    def sample(self) -> Task:
        return self.task


def make_model(a: argparse.Namespace, classes: int) -> torch.nn.Module:
    torch.manual_seed(a.seed)
    cfg = ModelConfig(arch=a.arch, encoder=a.encoder,
                      extra={"encoder_depth": a.depth, "decoder_channels": list(DEFAULT_DECODER[:a.depth])})
    return build_model(cfg, classes)


def make_task(a: argparse.Namespace, device: torch.device) -> Task:
    n = max(a.shots, a.query)
    (xs, ys), (xq, yq) = synthetic_task(n=n, size=a.size, seed=a.seed)
    return Task("synthetic", (xs[:a.shots], ys[:a.shots]), (xq[:a.query], yq[:a.query])).to(device)


def plain_step(model, task: Task, a, precision: Precision) -> Callable[[], None]:
    """K+1 ordinary training steps: forward, loss, backward, SGD update."""
    opt = torch.optim.SGD(model.parameters(), lr=a.inner_lr)
    scaler = precision.grad_scaler()
    batches = [task.support] * a.inner_steps + [task.query]

    def step():
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            with precision.autocast():
                logits = model(x)
            scaler.scale(pixel_cross_entropy(full_precision(logits), y)).backward()
            scaler.step(opt)
            scaler.update()
    return step


def raw_higher_step(model, task: Task, a, precision: Precision, first_order: bool) -> Callable[[], None]:
    """MAML as higher's README writes it: innerloop_ctx, DifferentiableOptimizer, Adam outer step.
    fp16 runs unscaled here (higher's optimiser cannot unscale): a timing floor only."""
    import higher

    outer = torch.optim.Adam(model.parameters(), lr=a.outer_lr)
    inner = torch.optim.SGD(model.parameters(), lr=a.inner_lr)
    params = list(model.parameters())

    def loss(fmodel, batch):
        with precision.autocast():
            logits = fmodel(batch[0])
        return pixel_cross_entropy(full_precision(logits), batch[1])

    def step():
        outer.zero_grad(set_to_none=True)
        with higher.innerloop_ctx(model, inner, copy_initial_weights=False,
                                  track_higher_grads=not first_order) as (fmodel, diffopt):
            for _ in range(a.inner_steps):
                diffopt.step(loss(fmodel, task.support))
            query = loss(fmodel, task.query)
            if first_order:  # the query gradient at phi_K, applied to theta
                grads = torch.autograd.grad(query, list(fmodel.parameters(time=-1)), allow_unused=True)
                for p, g in zip(params, grads):
                    p.grad = g
            else:
                query.backward()
        outer.step()
    return step


def raw_func_step(model, task: Task, a, precision: Precision) -> Callable[[], None]:
    """Second-order MAML in a dozen lines of torch.func: the peers' reference loop."""
    from torch.func import functional_call

    outer = torch.optim.Adam(model.parameters(), lr=a.outer_lr)

    def loss(params, batch):
        with precision.autocast():
            logits = functional_call(model, params, (batch[0],))
        return pixel_cross_entropy(full_precision(logits), batch[1])

    def step():
        outer.zero_grad(set_to_none=True)
        params = dict(model.named_parameters())
        for _ in range(a.inner_steps):
            grads = torch.autograd.grad(loss(params, task.support), list(params.values()), create_graph=True)
            params = {n: p - a.inner_lr * g for (n, p), g in zip(params.items(), grads)}
        loss(params, task.query).backward()
        outer.step()
    return step


def algorithm_options(a: argparse.Namespace, algorithm: str) -> dict:
    """The algorithm's own keyword arguments from the command line (iMAML's lambda and CG)."""
    if algorithm == "imaml":
        return {"lam": a.imaml_lambda, "cg_steps": a.cg_steps, "cg_damping": a.cg_damping}
    return {}


def learner_step(model, task: Task, a, precision: Precision, algorithm: str, backend: str,
                 checkpoint_inner: bool = False) -> Callable[[], None]:
    """The project's meta-step: ``ALGORITHMS[algorithm](...).meta_step`` on one task."""
    learner = ZOO[algorithm](model, inner_lr=a.inner_lr, inner_steps=a.inner_steps,
                             precision=precision, backend=backend, checkpoint_inner=checkpoint_inner,
                             outer=OuterSettings(lr=a.outer_lr, meta_batch=1), **algorithm_options(a, algorithm))
    opt, scaler, sampler = learner.make_optimizer(), precision.grad_scaler(), Fixed(task)
    counter = iter(range(1, 10**9))

    def step():
        learner.meta_step(sampler, opt, scaler, next(counter))
    return step


def config_names(a: argparse.Namespace) -> list[str]:
    names = ["plain"] + ([] if a.no_floors else ["raw_higher", "raw_higher_fo", "raw_func"])
    names += [f"{alg}/{be}" for alg in a.algorithms for be in a.backends]
    if a.checkpoint_inner:
        names += [f"maml/{be}+ckpt" for be in a.backends]
    return names


def make_step(name: str, a: argparse.Namespace, model, task: Task, precision: Precision) -> Callable[[], None]:
    model = copy.deepcopy(model)  # every configuration starts from the same weights
    if name == "plain":
        return plain_step(model, task, a, precision)
    if name.startswith("raw_higher"):
        return raw_higher_step(model, task, a, precision, first_order=name.endswith("_fo"))
    if name == "raw_func":
        return raw_func_step(model, task, a, precision)
    algorithm, backend = name.split("/")
    backend, _, ckpt = backend.partition("+")
    return learner_step(model, task, a, precision, algorithm, backend, checkpoint_inner=bool(ckpt))


def timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def setup(a: argparse.Namespace) -> tuple[torch.device, Precision]:
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{sys.argv[0]}: error: --device {a.device} but no CUDA device is available")
    return device, Precision(a.precision, device.type)


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:  # this process's own high-water mark; ru_maxrss survives exec, so a child would report its parent's
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


# -- subprocess entries ---------------------------------------------------------------------
def run_memory_of(a: argparse.Namespace) -> dict:
    """Two steps of one configuration in this fresh process; its peak memory."""
    device, precision = setup(a)
    model = make_model(a, len(CLASSES)).to(device)
    fn = make_step(a.memory_of, a, model, make_task(a, device), precision)
    del model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):
        timed(fn, device)
    return {"config": a.memory_of, "peak_bytes": peak_bytes(device)}


def run_cell(a: argparse.Namespace) -> list[dict]:
    """One configuration at one image size, for every K of ``--grid-k`` in increasing order, in
    this fresh process: a warm-up step, REPS timed steps and the peak memory per K.

    On CPU the peak is the process's high-water mark so far: memory does not shrink as K
    grows (a longer loop keeps at least as much), so it is the peak at this K. On CUDA the
    allocator's peak is reset before each K.
    """
    device, precision = setup(a)
    model = make_model(a, len(CLASSES)).to(device)
    task = make_task(a, device)
    rows = []
    for k in sorted(a.grid_k):
        a.inner_steps = k
        fn = make_step(a.cell, a, model, task, precision)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timed(fn, device)
        times = [timed(fn, device) for _ in range(a.reps)]
        rows.append({"config": a.cell, "size": a.size, "k": k, "seconds": statistics.median(times),
                     "min": min(times), "max": max(times), "peak_bytes": peak_bytes(device)})
        print(json.dumps(rows[-1]), flush=True)  # each K as it is done: a cell killed later keeps it
        del fn
    return rows


def child(argv: list[str], extra: list[str], *, partial: bool = False):
    """Run this script with ``argv + extra`` in a fresh process, which prints JSON lines.

    Returns the last line's object; with ``partial``, the list of every line's object and a
    failure note (``None`` when the process succeeded), so a grid cell killed at a large K
    (out of memory) keeps its smaller K and the grid goes on.
    """
    out = subprocess.run([sys.executable, __file__, *argv, *extra], capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0:
        why = (f"killed by signal {-out.returncode}, likely out of memory" if out.returncode < 0
               else f"exit {out.returncode}: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
        if not partial:
            raise SystemExit(f"{sys.argv[0]}: error: {' '.join(extra)} failed ({why}):\n{out.stderr[-3000:]}")
        print(f"# {' '.join(extra)}: failed after {len(lines)} K value(s) ({why})", file=sys.stderr, flush=True)
        return lines, why
    return (lines, None) if partial else lines[-1]


def strip_modes(argv: list[str]) -> list[str]:
    """The command line without the mode flags and the json path, for the subprocesses."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--grid", "--data-path"):
            continue
        if arg == "--json":
            skip = True
            continue
        if arg.startswith("--json="):
            continue
        out.append(arg)
    return out


# -- the three modes --------------------------------------------------------------------
def header(a: argparse.Namespace, device: torch.device, what: str) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} thread(s)"
    size_k = (f"{'/'.join(map(str, a.grid_sizes))} px, K in {sorted(a.grid_k)}" if a.grid
              else f"{a.size} px, K={a.inner_steps}")
    return (f"# {what}: {a.arch}-{a.encoder} depth {a.depth}, {size_k}, {a.shots}+{a.query} images, "
            f"precision {a.precision}, {name}; torch {torch.__version__}\n"
            f"# command: python scripts/bench_meta_step.py {' '.join(sys.argv[1:])}")


def ratio(x: Optional[float], base: Optional[float]) -> str:
    return f"{x / base:.2f}" if x is not None and base else "-"


def targets(rows: dict) -> list[str]:
    """The step-cost targets, each with the measured value (ratios measured in this run)."""
    def t(name):
        return rows.get(name, {}).get("seconds")

    def m(name):
        return rows.get(name, {}).get("peak_bytes")

    plain, raw, lines = t("plain"), t("raw_higher"), []

    def check(what, value, limit):
        if value is not None:
            lines.append(f"- {what}: {value:.2f} (target <= {limit}) {'ok' if value <= limit else 'MISSED'}")

    if raw and t("maml/higher"):
        check("maml/higher vs raw_higher time", t("maml/higher") / raw, 1.05)
    if plain and t("raw_func"):  # is 2.5x reachable on this machine at all?
        check("raw_func (the peers' torch.func loop) vs plain time", t("raw_func") / plain, 2.5)
    if plain and t("maml/func"):
        check("maml/func vs plain time", t("maml/func") / plain, 2.5)
        if t("raw_func"):
            check("maml/func vs raw_func time", t("maml/func") / t("raw_func"), 1.05)
        if t("maml/higher"):
            check("maml/func vs maml/higher time", t("maml/func") / t("maml/higher"), 1.0)
    for be in BACKENDS:
        if plain and t(f"fomaml/{be}"):
            check(f"fomaml/{be} vs plain time", t(f"fomaml/{be}") / plain, 1.05)
        if plain and t(f"anil/{be}"):
            check(f"anil/{be} vs plain time", t(f"anil/{be}") / plain, 0.6)
        if m("plain") and m(f"maml/{be}"):
            check(f"maml/{be} vs plain peak memory", m(f"maml/{be}") / m("plain"), 2.1)
    return lines


def run_compare(a: argparse.Namespace, argv: list[str]) -> dict:
    device, precision = setup(a)
    model = make_model(a, len(CLASSES)).to(device)
    task = make_task(a, device)
    names = config_names(a)
    steps = {name: make_step(name, a, model, task, precision) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm-up: allocator, autograd caches, higher's patching
        timed(steps[name], device)
    for _ in range(a.reps):  # round-robin
        for name in names:
            times[name].append(timed(steps[name], device))
    del steps
    rows = {name: {"config": name, "seconds": statistics.median(ts), "min": min(ts), "max": max(ts)}
            for name, ts in times.items()}
    if not a.no_memory:
        for name in names:
            rows[name]["peak_bytes"] = child(strip_modes(argv), ["--memory-of", name])["peak_bytes"]
    plain, raw, raw_fo = (rows.get(n, {}).get("seconds") for n in ("plain", "raw_higher", "raw_higher_fo"))
    mem_plain = rows["plain"].get("peak_bytes")
    print(header(a, device, f"meta-step, median of {a.reps} interleaved rounds"))
    table = []
    for name, r in rows.items():
        floor = raw_fo if name.split("/")[0] in FIRST_ORDER else raw
        peak = r.get("peak_bytes")
        table.append([name, f"{r['seconds']:.3f} ({r['min']:.3f}-{r['max']:.3f})", ratio(r["seconds"], plain),
                      ratio(r["seconds"], floor), f"{peak / 2**20:.0f}" if peak else "-",
                      ratio(peak, mem_plain) if peak else "-"])
    print("\n".join(markdown_table(["configuration", "s / meta-step (min-max)", "vs plain K+1", "vs raw higher",
                                    "peak MiB", "memory vs plain"], table)))
    lines = targets(rows)
    if lines:
        print("\nTargets (the step-cost goals):")
        print("\n".join(lines))
    return {"mode": "compare", "rows": list(rows.values())}


def run_grid(a: argparse.Namespace, argv: list[str]) -> dict:
    device, _ = setup(a)
    base = strip_modes(argv)
    names = ["plain"] + [f"{alg}/{be}" for alg in a.algorithms for be in a.backends]
    names += [f"maml/{be}+ckpt" for be in a.backends] if a.checkpoint_inner else []
    rows = []
    print(header(a, device, f"cost growth, median of {a.reps} step(s) after a warm-up, fresh process per cell"))
    header_row = ["configuration", "size", "K", "s / meta-step", "vs plain", "peak MiB", "memory vs plain"]
    print("\n".join(markdown_table(header_row, [])))  # then a row as each cell finishes
    for size in a.grid_sizes:
        cells = {name: child(base, ["--size", str(size), "--cell", name], partial=True) for name in names}
        for i, k in enumerate(sorted(a.grid_k)):
            plain = cells["plain"][0][i] if i < len(cells["plain"][0]) else None
            for name in names:
                done, why = cells[name]
                if i >= len(done):
                    rows.append({"config": name, "size": size, "k": k, "failed": why})
                    failed = [name, size, k, f"failed: {why}", "-", "-", "-"]
                    print(markdown_table(header_row, [failed])[-1], flush=True)
                    continue
                r = done[i]
                rows.append(r)
                print(markdown_table(header_row, [[name, size, k, f"{r['seconds']:.3f}",
                                                   ratio(r["seconds"], plain and plain["seconds"]),
                                                   f"{r['peak_bytes'] / 2**20:.0f}",
                                                   ratio(r["peak_bytes"], plain and plain["peak_bytes"])]])[-1],
                      flush=True)
    print_growth(rows, names)
    return {"mode": "grid", "rows": rows}


def print_growth(rows: list[dict], names: list[str]) -> None:
    """Peak memory and time at the largest K over those at the smallest, per configuration and size."""
    done = [r for r in rows if "peak_bytes" in r]
    ks = sorted({r["k"] for r in done})
    if len(ks) < 2:
        return
    print(f"\nGrowth from K={ks[0]} to K={ks[-1]} (largest K over smallest; flat = 1.00):")
    table = []
    for size in sorted({r["size"] for r in done}):
        for name in names:
            by_k = {r["k"]: r for r in done if r["config"] == name and r["size"] == size}
            if ks[0] in by_k and ks[-1] in by_k:
                lo, hi = by_k[ks[0]], by_k[ks[-1]]
                table.append([name, size, f"{lo['peak_bytes'] / 2**20:.0f} -> {hi['peak_bytes'] / 2**20:.0f}",
                              ratio(hi["peak_bytes"], lo["peak_bytes"]), ratio(hi["seconds"], lo["seconds"])])
    print("\n".join(markdown_table(["configuration", "size", "peak MiB", "memory growth", "time growth"], table)))


def run_data_path(a: argparse.Namespace) -> dict:
    """The real loader against the same tasks preloaded: the fraction loading adds to a step."""
    from hydra import compose, initialize_config_module

    import metaseg.config  # noqa: F401 - registers the schemas
    from metaseg.data.mix import build_mix
    from metaseg.data.tasks import TaskSampler

    device, precision = setup(a)
    with initialize_config_module(config_module="metaseg.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=["data=binary_mix", f"data.root={a.data_root}",
                                                      f"data.size={a.size}", f"seed={a.seed}"])
    t = time.perf_counter()
    mix = build_mix(cfg.data)
    build_seconds = time.perf_counter() - t
    # a second copy of the mix preloads the tasks: augmentation draws from each dataset's own
    # generator, so the copy yields exactly the tasks the real loader will (checked at the end)
    mix_ref = build_mix(cfg.data)

    def sampler(m=mix):
        return TaskSampler(m.train, m.weights, a.shots, a.query, seed=a.seed)

    class Replay:  # the tasks the real sampler draws, decoded and augmented beforehand
        def __init__(self, tasks):
            self.tasks = iter(tasks)

        def sample(self):
            return next(self.tasks)

    n = a.reps + 1
    reference = sampler(mix_ref)
    preloaded = [reference.sample() for _ in range(n)]
    load_times = []
    probe = sampler(mix_ref)  # the loader alone, on the copy (its stream is not the real run's)
    for _ in range(n):
        load_times.append(timed(probe.sample, torch.device("cpu")))
    model = make_model(a, mix.num_classes).to(device)

    def learner():
        m = copy.deepcopy(model)
        lr = ZOO[a.data_algorithm](m, inner_lr=a.inner_lr, inner_steps=a.inner_steps,
                                   precision=precision, backend=a.backends[0], outer=OuterSettings(lr=a.outer_lr),
                                   **algorithm_options(a, a.data_algorithm))
        return lr, lr.make_optimizer(), precision.grad_scaler()

    real, pre = learner(), learner()
    real_sampler, replay = sampler(), Replay(preloaded)
    times = {"real loader": [], "preloaded": []}
    for i in range(n):  # step 1 is the warm-up of both; the order alternates, so neither always goes first
        run_real = lambda: real[0].meta_step(real_sampler, real[1], real[2], i + 1, device=device)  # noqa: E731
        run_pre = lambda: pre[0].meta_step(replay, pre[1], pre[2], i + 1, device=device)  # noqa: E731
        if i % 2:
            tp, tr = timed(run_pre, device), timed(run_real, device)
        else:
            tr, tp = timed(run_real, device), timed(run_pre, device)
        if i:
            times["real loader"].append(tr)
            times["preloaded"].append(tp)
    same = all(torch.equal(p, q) for p, q in zip(real[0].model.parameters(), pre[0].model.parameters()))
    med = {k: statistics.median(v) for k, v in times.items()}
    load = statistics.median(load_times[1:] or load_times)
    added = med["real loader"] / med["preloaded"] - 1
    print(header(a, device, f"data path, {a.data_algorithm}/{a.backends[0]}, data=binary_mix "
                            f"(train: {', '.join(mix.train)}), median of {a.reps} interleaved steps"))
    print("\n".join(markdown_table(["step with", "s / meta-step (min-max)"],
                                   [[k, f"{med[k]:.3f} ({min(v):.3f}-{max(v):.3f})"] for k, v in times.items()])))
    print(f"\nadded by the loader: {100 * added:+.1f}% of a meta-step (difference of medians); "
          f"TaskSampler.sample alone: {load:.4f} s = {100 * load / med['preloaded']:.1f}% of the preloaded step; "
          f"decoding every image once when the mix is built: {build_seconds:.1f} s (not per step); "
          f"same tasks and weights in both runs: {same}")
    return {"mode": "data_path", "seconds": med, "added_fraction": added, "sample_seconds": load,
            "sample_fraction": load / med["preloaded"], "build_seconds": build_seconds, "same_weights": same}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse(argv)
    if a.memory_of:
        print(json.dumps(run_memory_of(a)))
        return 0
    if a.cell:
        run_cell(a)  # prints one JSON line per K
        return 0
    if a.data_path:
        result = run_data_path(a)
    elif a.grid:
        result = run_grid(a, argv)
    else:
        result = run_compare(a, argv)
    if a.json:
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
