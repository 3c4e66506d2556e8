#!/usr/bin/env python
"""Time and memory of one outer step for every algorithm, side by side in one process.

Each algorithm (a YAML of ``conf/meta/``) gets the same model (the default U-Net, same
seed), the same data mix and task stream, and the same K, meta-batch, shots and query
(overridden here so the numbers compare; MLDG runs at this K, not its YAML's K = 1; MAML++
in its second-order phase, with the multi-step loss and learned per-step rates on).
Steps are interleaved round-robin across algorithms, so machine load drifts hit them all
alike; the table shows the median seconds per outer step and its spread. Memory is the peak
of CPU (or CUDA) memory allocated during one outer step above what was allocated before
it, from the PyTorch profiler's allocation events (CPU) or ``max_memory_allocated`` (CUDA).
Images through forward and backward passes are counted by the budget accounting
(``metaseg.engine.training.budget``), as a training run counts them, on either inner-loop backend.

    python scripts/algo_cost.py                       # defaults: 64 px, K=3, 2 tasks of 4+4, 5 timed steps
    python scripts/algo_cost.py --size 128 --steps 10 --algorithms maml anil --json cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from torch.profiler import ProfilerActivity, profile

import metaseg.config  # noqa: F401 - registers the schemas
from metaseg.engine.training.budget import Budget
from metaseg.utils.tables import markdown_table
from step_cost import interleaved_seconds, prepare  # scripts/step_cost.py

ROOT = Path(__file__).resolve().parents[1]
ALL = ["maml", "fomaml", "anil", "metasgd", "mamlpp", "reptile", "mldg", "erm"]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--algorithms", nargs="+", default=ALL, help="names of conf/meta/*.yaml (default: %(default)s)")
    p.add_argument("--size", type=int, default=64, help="image size in pixels (default: %(default)s)")
    p.add_argument("--inner-steps", type=int, default=3, help="K for every algorithm (default: %(default)s)")
    p.add_argument("--meta-batch", type=int, default=2, help="tasks per outer step (default: %(default)s)")
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--query", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed outer steps per algorithm (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="32", choices=["32", "bf16", "16"])
    p.add_argument("--overrides", nargs="*", default=[], help="more Hydra overrides, e.g. model.encoder=resnet34")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def build(name: str, a: argparse.Namespace, device: torch.device) -> dict:
    overrides = [f"meta={name}", f"data.size={a.size}", f"meta.inner_steps={a.inner_steps}",
                 f"meta.meta_batch={a.meta_batch}", f"meta.shots={a.shots}", f"meta.query={a.query}",
                 f"trainer.precision={a.precision}", *a.overrides]
    if name == "mamlpp":  # time its second-order phase (the multi-step loss is still on then)
        overrides.append("meta.first_order_until=0")
    with initialize_config_module(config_module="metaseg.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    runner = prepare(cfg, device)
    return {"runner": runner, "budget": Budget(runner.model), "cfg": cfg}


def peak_bytes(r: dict, device: torch.device) -> int:
    """Peak memory allocated during one outer step, above the level before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        r["runner"].step()
        return torch.cuda.max_memory_allocated() - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        r["runner"].step()
    level = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        level += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, level)
    return peak


def main(argv=None) -> int:
    a = parse(argv)
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    runs = {name: build(name, a, device) for name in a.algorithms}
    for r in runs.values():  # the budget accounting's counts of one step (after a warm-up step)
        r["runner"].step()
        with r["budget"].counting():
            r["runner"].step()
        r["forward"], r["backward"] = r["budget"].forward_images, r["budget"].backward_images
    # round-robin, so load drift hits every algorithm alike
    times = interleaved_seconds({name: r["runner"] for name, r in runs.items()}, a.steps, warmup=0)
    for name, r in runs.items():
        r["times"] = times[name]
    for r in runs.values():
        r["peak"] = peak_bytes(r, device)

    base = statistics.median(runs["maml"]["times"]) if "maml" in runs else None
    rows = []
    for name, r in runs.items():
        med = statistics.median(r["times"])
        rows.append({"algorithm": name, "seconds_per_step": med, "min": min(r["times"]), "max": max(r["times"]),
                     "vs_maml": med / base if base else None, "peak_mb": r["peak"] / 2**20,
                     "forward_images": r["forward"], "backward_images": r["backward"]})
    print(f"# {a.size}px, K={a.inner_steps}, meta_batch={a.meta_batch}, shots={a.shots}, query={a.query}, "
          f"precision {a.precision}, {device}, {a.threads} thread(s), median of {a.steps} steps; "
          f"torch {torch.__version__}; overrides {a.overrides}")
    print("\n".join(markdown_table(
        ["algorithm", "s / outer step (min-max)", "vs maml", "peak MiB / step", "forward images", "backward images"],
        [[row["algorithm"], f"{row['seconds_per_step']:.2f} ({row['min']:.2f}-{row['max']:.2f})",
          f"{row['vs_maml']:.2f}" if row["vs_maml"] else "-", f"{row['peak_mb']:.0f}", row["forward_images"],
          row["backward_images"]] for row in rows])))
    if a.json:
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
