"""Compare arms fairly on the generated mix: same budget, adaptation tuned on validation tasks.

Arms (each a metaseg-train run, one after the other, in ``--out/ARM``):

* ``maml``: second-order MAML from random weights, ``--steps`` outer steps;
* ``erm``: joint training, ``--steps`` outer steps (the control);
* ``two_stage``: ``experiment=two_stage`` with ``--steps / 2`` erm steps then ``--steps / 2`` maml steps;
* ``fomaml`` (with ``--more``): first-order MAML, ``--steps`` outer steps;
* ``scratch``: a random init (``metaseg-eval checkpoint=none``), no training.

Every arm ends with ``eval.tune=true``: ``adapt_lr`` x ``adapt_steps`` from the same grid chosen
on validation tasks of the training domains, then the held-out domains with the choice.
``best.pt`` is selected on validation tasks, never held out. Prints a markdown table with
both budget views (images through forward/backward passes; seconds).

    OMP_NUM_THREADS=1 python scripts/fair_compare.py --steps 60 --out outputs/fair
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

import metaseg.config  # noqa: F401 - registers the schemas
from metaseg.engine.eval_checkpoint import evaluate_checkpoint
from metaseg.engine.trainer import train

TUNE = ["eval.tune=true", "eval.tune_lrs=[0.03,0.1,0.3]", "eval.tune_steps=[3,10]", "eval.tune_episodes=2"]


def _cfg(name: str, overrides: list[str]):
    with initialize_config_module(config_module="metaseg.conf", version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def arms(steps: int, more: bool) -> dict[str, list[str]]:
    half = steps // 2
    out = {"maml": ["meta=maml", f"trainer.max_steps={steps}"],
           "erm": ["meta=erm", f"trainer.max_steps={steps}"],
           "two_stage": ["experiment=two_stage", f"pretrain.steps={half}", f"trainer.max_steps={steps - half}"]}
    if more:
        out["fomaml"] = ["meta=fomaml", f"trainer.max_steps={steps}"]
    return out


def row(arm: str, metrics: dict, budget: dict) -> dict:
    tune = metrics["tune"]
    fixed = next((r["score"] for r in tune["grid"] if r["adapt_lr"] == 0.1 and r["adapt_steps"] == 3), float("nan"))
    held = {n: d["adapted"]["miou"] for n, d in metrics["datasets"].items()}
    total = budget.get("total", {})
    return {"arm": arm, "outer_steps": total.get("outer_steps", 0), "forward_images": total.get("forward_images", 0),
            "backward_images": total.get("backward_images", 0), "train_s": total.get("train_seconds", 0.0),
            "total_s": total.get("seconds", 0.0), "chosen": tune["chosen"], "val_fixed": fixed,
            "val_tuned": tune["score"], "heldout": held,
            "heldout_mean": sum(h["mean"] for h in held.values()) / len(held)}


def markdown(rows: list[dict]) -> str:
    names = list(rows[0]["heldout"])
    lines = ["| arm | outer steps | fwd images | bwd images | train s | total s | tuned α, K | "
             "val 5-shot mIoU at α=0.1, K=3 | val tuned | " + " | ".join(f"{n} 5-shot mIoU" for n in names)
             + " | held-out mean |",
             "|---" * (10 + len(names)) + "|"]
    for r in rows:
        held = " | ".join(f"{r['heldout'][n]['mean']:.3f} ± {r['heldout'][n]['ci95']:.3f}" for n in names)
        lines.append(f"| {r['arm']} | {r['outer_steps']} | {r['forward_images']} | {r['backward_images']} | "
                     f"{r['train_s']:.0f} | {r['total_s']:.0f} | {r['chosen']['adapt_lr']:g}, "
                     f"{r['chosen']['adapt_steps']} | {r['val_fixed']:.3f} | {r['val_tuned']:.3f} | {held} | "
                     f"{r['heldout_mean']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="outer steps of every trained arm (two-stage: split)")
    parser.add_argument("--out", default="outputs/fair", help="folder for the arms' runs")
    parser.add_argument("--episodes", type=int, default=5, help="held-out episodes per domain")
    parser.add_argument("--more", action="store_true", help="also fomaml")
    parser.add_argument("--only", nargs="*", help="run only these arms (others are read from --out)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    out = Path(args.out)
    common = ["trainer.device=cpu", f"eval.episodes={args.episodes}", "eval.val_episodes=2", "eval.pictures=0",
              "trainer.monitor_tasks=0", f"trainer.eval_every={max(args.steps // 2, 1)}", *TUNE]
    rows = []
    for arm, overrides in arms(args.steps, args.more).items():
        d = out / arm
        if args.only is None or arm in args.only:
            t0 = time.perf_counter()
            train(_cfg("train", [*overrides, *common]), d)
            print(f"{arm}: {time.perf_counter() - t0:.0f} s", flush=True)
    d = out / "scratch"
    if args.only is None or "scratch" in args.only:
        evaluate_checkpoint(_cfg("eval", ["checkpoint=none", "data=synthetic", "device=cpu",
                                          f"eval.episodes={args.episodes}", "eval.val_episodes=2", "eval.pictures=0",
                                          *TUNE]), d)
    for arm in arms(args.steps, args.more):  # read back after every arm ran (a table error loses no run)
        d = out / arm
        rows.append(row(arm, json.loads((d / "metrics.json").read_text()), json.loads((d / "budget.json").read_text())))
    rows.append(row("scratch", json.loads((out / "scratch" / "eval.json").read_text()), {}))
    text = markdown(rows)
    (out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
