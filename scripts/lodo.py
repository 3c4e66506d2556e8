"""The leave-one-dataset-out study: does meta-learning beat joint training on an unseen dataset?

Folds (``--folds``): each retina site held out in turn (study 1: meta-train on the other two
sites plus polyps, lesions and membranes) and the polyps held out (study 2: a new kind of
structure, meta-trained on vessels, lesions and membranes). Arms (``--arms``), all with the
same model, data, outer steps (ERM makes MAML's forward and backward passes per step; see
``budget.json``) and evaluation protocol (``experiment=lodo``: adaptation step size and
step count chosen by ``eval.tune`` on validation tasks of the training sets, then the
held-out set scored whole by sliding window, 5 seeded episodes per k; ``--set eval.episodes=10``
with time to spare):

* ``maml``, ``fomaml``, ``anil``, ``erm``: ``metaseg-train experiment=lodo meta=ARM``;
* ``scratch``: random initialisation, k-shot fine-tuning only (``metaseg-eval
  checkpoint=none``) with a longer fine-tuning grid (``--scratch-steps``).

Every run goes to ``OUT/FOLD/ARM`` with its log; a run that finished (``done.json``) is not
redone, and an interrupted training run resumes from its last checkpoint, so the study can
span several sittings. The tables (``OUT/results.md``, ``OUT/results.json``) are rebuilt from
whatever runs have finished. ``--set KEY=VALUE`` passes overrides to every run (for example
``--set trainer.max_steps=2000 data.size=128`` on a GPU).

Two variants of the protocol, each into its own ``--out``:

* ``--tune-same-kind``: adaptation is tuned on the validation sets of the training datasets of
  the held-out set's kind only (``eval.tune_datasets``; the other retina sites for a retina
  fold), not on the mean over vessels, polyps, lesions and membranes; a fold with no such
  set (polyps) tunes on all of them, as before.
* ``--checkpoints-from DIR``: the trained arms are not trained again; their ``best.pt`` in
  ``DIR/FOLD/ARM/checkpoints`` is evaluated (``metaseg-eval``) with this invocation's
  evaluation settings, on the checkpoint's own mix found under ``--data-root``. Re-scoring a
  finished study under another evaluation protocol costs its evaluations only.

    python scripts/lodo.py --out outputs/lodo --jobs 2
    python scripts/lodo.py --out outputs/lodo_kind --checkpoints-from outputs/lodo --tune-same-kind
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

FOLDS = ["retina_drive", "retina_stare", "retina_chasedb1", "polyp_kvasir_seg"]
ARMS = ["maml", "fomaml", "anil", "erm", "scratch"]
RUN_ORDER = ["maml", "erm", "scratch", "anil", "fomaml"]


@functools.lru_cache(maxsize=None)
def _eval_overrides(extra: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(eval_overrides(list(extra)))


def eval_overrides(extra: list[str]) -> list[str]:
    """``experiment=lodo``'s eval block and loss as overrides, for ``metaseg-eval`` (scratch)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    import metaseg.config  # noqa: F401 - registers the schemas

    with initialize_config_module(config_module="metaseg.conf", version_base="1.3"):
        cfg = compose("train", ["experiment=lodo", *extra])
    out = []
    for key, value in OmegaConf.to_container(cfg.eval).items():
        text = json.dumps(value).replace(" ", "") if value is not None else "null"
        out.append(f"eval.{key}={text}")
    return [*out, f"meta.loss={cfg.meta.loss}"]


KINDS = ("retina_", "polyp_", "skin_", "em_")  # datasets of one kind share a name prefix


@functools.lru_cache(maxsize=None)
def _training_sets(fold: str, extra: tuple[str, ...]) -> tuple[str, ...]:
    """The datasets a fold meta-trains on (``data.train``, else every dataset but the held-out one)."""
    from hydra import compose, initialize_config_module

    import metaseg.config  # noqa: F401 - registers the schemas

    with initialize_config_module(config_module="metaseg.conf", version_base="1.3"):
        cfg = compose("train", ["experiment=lodo", f"data.heldout=[{fold}]", *extra])
    names = list(cfg.data.train) if cfg.data.train else list(cfg.data.datasets)
    return tuple(n for n in names if n not in cfg.data.heldout)


def same_kind(fold: str, training: tuple[str, ...]) -> list[str]:
    """The training datasets of ``fold``'s kind (empty when there is none)."""
    kind = next((k for k in KINDS if fold.startswith(k)), None)
    return [n for n in training if kind and n.startswith(kind)]


def tune_overrides(fold: str, args) -> list[str]:
    if not args.tune_same_kind:
        return []
    names = same_kind(fold, _training_sets(fold, tuple(args.set)))
    return [f"eval.tune_datasets=[{','.join(names)}]"] if names else []


def command(fold: str, arm: str, run: Path, args) -> list[str]:
    tune = tune_overrides(fold, args)
    evals = list(_eval_overrides(tuple(args.set)))
    if arm != "scratch" and args.checkpoints_from:  # a trained arm of another study, this study's evaluation
        best = Path(args.checkpoints_from) / fold / arm / "checkpoints" / "best.pt"
        return [sys.executable, "-m", "metaseg.eval", f"checkpoint={best}", f"data_root={args.data_root}",
                f"hydra.run.dir={run}", f"seed={args.seed}", *[o for o in evals if o.startswith("eval.")], *tune,
                *[o for o in args.set if o.startswith("eval.")]]  # model, meta and data: the checkpoint's
    common = [f"data.heldout=[{fold}]", f"data.root={args.data_root}", f"hydra.run.dir={run}"]
    if arm == "scratch":
        evals = [o for o in evals if not o.startswith("eval.tune_steps=")]
        return [sys.executable, "-m", "metaseg.eval", "checkpoint=none", "data=binary_patches", *common,
                f"seed={args.seed}", *evals, f"eval.tune_steps=[{','.join(map(str, args.scratch_steps))}]", *tune,
                *[o for o in args.set if o.startswith(("data.", "model."))]]
    return [sys.executable, "-m", "metaseg.train", "experiment=lodo", f"meta={arm}", f"seed={args.seed}",
            "trainer.resume=auto", *common, f"trainer.threads={args.threads}", *tune, *args.set]


def run_one(fold: str, arm: str, args) -> str:
    run = Path(args.out) / fold / arm
    if (run / "done.json").exists():
        return f"{fold}/{arm}: done before"
    run.mkdir(parents=True, exist_ok=True)
    cmd = command(fold, arm, run, args)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    with open(run / "log.txt", "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.perf_counter() - t0
    if rc != 0:
        return f"{fold}/{arm}: FAILED (exit {rc}), see {run / 'log.txt'}"
    (run / "done.json").write_text(json.dumps({"command": cmd, "seconds": seconds}, indent=1) + "\n")
    return f"{fold}/{arm}: {seconds:.0f} s"


# -- tables -------------------------------------------------------------------------------
def read_run(run: Path) -> dict | None:
    if not (run / "done.json").exists():
        return None
    result = json.loads(((run / "metrics.json") if (run / "metrics.json").exists() else run / "eval.json").read_text())
    budget = json.loads((run / "budget.json").read_text()).get("total", {}) if (run / "budget.json").exists() else {}
    done = json.loads((run / "done.json").read_text())
    return {"result": result, "budget": budget, "seconds": done["seconds"]}


def cell(stats: dict) -> str:
    return f"{stats['mean']:.3f} ± {stats['ci95']:.3f}"


def scores(run: dict, fold: str) -> dict:
    d = run["result"]["datasets"][fold]
    out = {"zero_shot": {key: d["zero_shot"]["image"][key] for key in ("fg_dice", "fg_iou")}}
    for k in (k for k in d.get("adapted", {}) if k.isdigit()):  # every k of eval.shots, by its own key
        out[k] = {key: d["adapted"][k]["image"][key] for key in ("fg_dice", "fg_iou")}
    return out


def tables(out: Path, folds: list[str], arms: list[str]) -> str:
    runs = {(f, a): read_run(out / f / a) for f in folds for a in arms}
    record = {f"{f}/{a}": {"scores": scores(r, f), "budget": r["budget"], "seconds": r["seconds"],
                           "tune": r["result"].get("tune", {}).get("chosen"),
                           "episodes": r["result"].get("protocol", {}).get("episodes")}
              for (f, a), r in runs.items() if r is not None}
    (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    shots = sorted({k for r in record.values() for k in r["scores"] if k.isdigit()}, key=int, reverse=True)
    lines = []
    for metric, label in (("fg_dice", "Dice"), ("fg_iou", "IoU")):
        episodes = sorted({r["episodes"] for r in record.values()}) or ["?"]
        lines += [f"### Foreground {label} (image-level, mean ± 95% CI over "
                  f"{'/'.join(map(str, episodes))} episodes)", "",
                  "| arm | " + " | ".join(f"{f} {k}-shot" for f in folds for k in ("0", *shots)) + " |",
                  "|---" * (1 + (1 + len(shots)) * len(folds)) + "|"]
        for a in arms:
            row = []
            for f in folds:
                r = record.get(f"{f}/{a}")
                if r is None:
                    row += ["–"] * (1 + len(shots))
                    continue
                s = r["scores"]
                row.append(f"{s['zero_shot'][metric]:.3f}")
                row += [cell(s[k][metric]) if k in s else "–" for k in shots]
            lines.append(f"| {a} | " + " | ".join(row) + " |")
        lines.append("")
    lines += ["### Budget and chosen adaptation", "",
              "| fold | arm | outer steps | forward images | backward images | train s | run s | tuned α, steps |",
              "|---|---|---|---|---|---|---|---|"]
    for (f, a), r in runs.items():
        if r is None:
            continue
        b, t = r["budget"], r["result"].get("tune", {}).get("chosen") or {}
        lines.append(f"| {f} | {a} | {b.get('outer_steps', 0)} | {b.get('forward_images', 0)} | "
                     f"{b.get('backward_images', 0)} | {b.get('train_seconds', 0):.0f} | {r['seconds']:.0f} | "
                     f"{t.get('adapt_lr')}, {t.get('adapt_steps')} |")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/lodo", help="study folder (runs, results.md, results.json)")
    parser.add_argument("--folds", nargs="+", default=FOLDS, choices=FOLDS, help="held-out datasets")
    parser.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    parser.add_argument("--data-root", default="../shared/data", help="folder holding the datasets")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each with --threads torch threads)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scratch-steps", type=int, nargs="+", default=[10, 30],
                        help="fine-tuning steps scratch chooses from on validation tasks (the others: 10)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    parser.add_argument("--tune-same-kind", action="store_true",
                        help="tune adaptation on the validation sets of the held-out set's kind only (eval.tune_datasets)")
    parser.add_argument("--checkpoints-from", metavar="DIR",
                        help="evaluate the trained arms' best.pt of the study in DIR instead of training them")
    parser.add_argument("--tables-only", action="store_true", help="rebuild the tables from finished runs")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.tables_only:
        t0 = time.perf_counter()
        # maml first (slowest, so parallel jobs finish together), then the controls, then the rest
        order = sorted(((f, a) for f in args.folds for a in args.arms), key=lambda fa: RUN_ORDER.index(fa[1]))
        _eval_overrides(tuple(args.set))  # composed once, here: Hydra's global state is not thread-safe
        for fold in args.folds:
            tune_overrides(fold, args)
        if args.checkpoints_from:
            missing = [f"{f}/{a}" for f in args.folds for a in args.arms if a != "scratch" and not
                       (Path(args.checkpoints_from) / f / a / "checkpoints" / "best.pt").is_file()]
            if missing:
                sys.exit(f"lodo.py: error: --checkpoints-from {args.checkpoints_from} has no checkpoints/best.pt for "
                         f"{', '.join(missing)}: train them there first, or leave those arms out (--arms)")
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            for message in pool.map(lambda fa: run_one(*fa, args), order):
                print(message, flush=True)
        print(f"study wall time {time.perf_counter() - t0:.0f} s", flush=True)
    print(tables(out, args.folds, args.arms))
    failed = [f"{f}/{a}" for f in args.folds for a in args.arms if not (out / f / a / "done.json").exists()]
    if failed and not args.tables_only:
        print(f"unfinished runs: {', '.join(failed)} (see their log.txt); rerun to retry them", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
