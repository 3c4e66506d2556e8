"""The converged study: meta-learning against joint training, with models that work.

Four folds (``--folds``): each retina site held out in turn (trained on the other two sites
plus polyps, lesions and membranes), and the polyps held out (trained on vessels, lesions and
membranes). Per fold, seven arms, all on one network, one data mix and one evaluation protocol
(``experiment=converged``: adaptation step size chosen on validation tasks of the training
sets, the held-out set scored whole at native resolution, seeded episodes, the adaptation
curve over ``eval.shots`` x ``eval.curve_steps``):

* ``erm``: joint training with the converged recipe (``experiment=converged meta=erm``);
* ``fomaml``, ``anil``, ``maml``, ``imaml``: a meta stage from erm's ``best.pt``
  (``experiment=converged_meta meta=ARM meta.init_from=...``), the same outer steps, tasks and
  images for each (iMAML's conjugate-gradient Hessian-vector products are counted as support
  backward passes by the budget);
* ``erm_more``: erm continued from the same checkpoint for the same meta-stage steps, tasks and
  images (``experiment=converged_meta meta=erm``): every two-stage arm's twin at equal images;
* ``scratch``: a random initialisation of the same network, adapted only (``metaseg-eval
  checkpoint=none``).

Every run goes to ``OUT/FOLD/ARM`` with its log. A finished run (``done.json``) is not redone;
an interrupted training run resumes from its last checkpoint (``trainer.resume=auto``), so the
study spans sittings: rerun the same command. Two-stage arms wait for their fold's erm run;
a failed erm run marks them skipped. The tables (``OUT/results.md``, ``OUT/results.json``) and
figures (``OUT/curves.png``, ``OUT/learning.png``) are rebuilt from whatever runs have finished;
``OUT/summary.md`` is the short table of the README (arms x folds, k-shot Dice, the best arm after
1 and 10 adaptation steps).

    python scripts/study.py --out outputs/study --jobs 2
    python scripts/study.py --out outputs/study --tables-only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from metaseg.engine.evaluation.results import DatasetResult, Estimate
from metaseg.engine.evaluation.summary import paired_difference
from metaseg.utils.tables import markdown_table

FOLDS = ["retina_drive", "retina_stare", "retina_chasedb1", "polyp_kvasir_seg"]
ARMS = ["erm", "fomaml", "anil", "maml", "imaml", "erm_more", "scratch"]
# arm -> its meta stage's algorithm
STAGED = {"fomaml": "fomaml", "anil": "anil", "maml": "maml", "imaml": "imaml", "erm_more": "erm"}
BASE = "erm"  # the run every staged arm starts from
ZERO_SHOT = "zero_shot"  # OUT/FOLD/erm/zero_shot: erm scored on every held-out image, no adaptation


# -- commands -----------------------------------------------------------------------------
def eval_block(experiment: str, extra: list[str]) -> list[str]:
    """The experiment's eval block and model as overrides for ``metaseg-eval checkpoint=none``."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    import metaseg.config  # noqa: F401 - registers the schemas

    with initialize_config_module(config_module="metaseg.conf", version_base="1.3"):
        cfg = compose("train", [f"experiment={experiment}", *extra])

    def flat(prefix: str, node: dict) -> list[str]:
        out = []
        for key, value in node.items():
            if isinstance(value, dict):
                out += flat(f"{prefix}.{key}", value)
            else:
                out.append(f"{prefix}.{key}=" + (json.dumps(value).replace(" ", "") if value is not None else "null"))
        return out

    model = OmegaConf.to_container(cfg.model)
    meta = {"loss": cfg.meta.loss, "inner_lr": cfg.meta.inner_lr, "inner_steps": cfg.meta.inner_steps}
    return flat("eval", OmegaConf.to_container(cfg.eval)) + flat("model", model) + flat("meta", meta)


def same_kind(fold: str) -> list[str]:
    """Adaptation is tuned on the validation sets of the held-out set's own kind where the mix has
    them (the other retina sites for a retina fold), else on all of them (null)."""
    kind = [f for f in FOLDS if f != fold and f.split("_")[0] == fold.split("_")[0]]
    return [f"eval.tune_datasets=[{','.join(kind)}]"] if kind else []


def zero_shot_command(fold: str, run: Path, args) -> list[str]:
    """erm's headline: every held-out image scored without adaptation, half-overlapping windows."""
    return [sys.executable, "-m", "metaseg.eval", f"checkpoint={run / 'checkpoints' / 'best.pt'}",
            f"data_root={args.data_root}", f"hydra.run.dir={run / ZERO_SHOT}", f"seed={args.seed}",
            *[o for o in args.set if o.startswith("eval.")], "eval.episodes=0", "eval.shots=0", "eval.curve_steps=[]",
            "eval.tune=false", "eval.max_images=null", "eval.mode=slide", "eval.stride=null",  # null: half the window
            "eval.batch_size=64", "eval.pictures=4", "eval.baseline=false"]  # the scratch arm is the baseline


def command(fold: str, arm: str, run: Path, args, scratch_evals: list[str]) -> list[str]:
    """The command line of one run."""
    common = [f"data.heldout=[{fold}]", f"data.root={args.data_root}", f"hydra.run.dir={run}", f"seed={args.seed}",
              *same_kind(fold)]
    if arm == "scratch":  # the erm recipe's evaluation block first, so that the fold's own keys override it
        return [sys.executable, "-m", "metaseg.eval", "checkpoint=none", "data=binary_patches", *scratch_evals,
                *common, *[o for o in args.set if o.startswith(("data.", "eval."))]]
    threads = [f"trainer.threads={args.threads}", "trainer.resume=auto"]
    if arm == BASE:
        return [sys.executable, "-m", "metaseg.train", f"experiment={args.experiment}", "meta=erm", *common, *threads,
                *args.set]
    init = Path(args.out) / fold / BASE / "checkpoints" / "best.pt"
    return [sys.executable, "-m", "metaseg.train", f"experiment={args.meta_experiment}", f"meta={STAGED[arm]}",
            f"meta.init_from={init}", *common, *threads, *args.set, *args.set_meta]


def execute(cmd: list[str], run: Path, args) -> Optional[float]:
    """Run ``cmd`` once into ``run`` (log.txt), marking ``done.json``; seconds, or None if it failed."""
    if (run / "done.json").exists():
        return json.loads((run / "done.json").read_text())["seconds"]
    run.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    with open(run / "log.txt", "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.perf_counter() - t0
    if rc != 0:
        return None
    (run / "done.json").write_text(json.dumps({"command": cmd, "seconds": seconds}, indent=1) + "\n")
    return seconds


def run_one(fold: str, arm: str, args, scratch_evals: list[str], after: Optional[Future] = None) -> str:
    run = Path(args.out) / fold / arm
    finished = (run / "done.json").exists() and (arm != BASE or (run / ZERO_SHOT / "done.json").exists())
    if finished:
        return f"{fold}/{arm}: done before"
    if after is not None:
        after.result()  # the fold's erm run, finished or failed
        if not (Path(args.out) / fold / BASE / "done.json").exists():
            return f"{fold}/{arm}: skipped, its {BASE} run did not finish"
    seconds = execute(command(fold, arm, run, args, scratch_evals), run, args)
    if seconds is not None and arm == BASE:
        extra = execute(zero_shot_command(fold, run, args), run / ZERO_SHOT, args)
        if extra is None:
            return f"{fold}/{arm}: FAILED (exit != 0), see {run / ZERO_SHOT / 'log.txt'}"
    if seconds is None:
        return f"{fold}/{arm}: FAILED (exit != 0), see {run / 'log.txt'}"
    return f"{fold}/{arm}: {seconds:.0f} s"


def run_study(args) -> None:
    """Every erm run first, then the rest; a staged arm waits for its fold's erm inside its worker,
    which cannot deadlock: all erm runs are queued ahead of every staged one."""
    scratch_evals = eval_block(args.experiment, args.set) if "scratch" in args.arms else []  # composed here, once
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures: dict[tuple[str, str], Future] = {}
        for fold in args.folds:
            if BASE in args.arms or any(a in STAGED for a in args.arms):
                futures[fold, BASE] = pool.submit(run_one, fold, BASE, args, scratch_evals)
        for arm in (a for a in args.arms if a != BASE):
            for fold in args.folds:
                futures[fold, arm] = pool.submit(run_one, fold, arm, args, scratch_evals,
                                                 futures.get((fold, BASE)) if arm in STAGED else None)
        for future in futures.values():
            print(future.result(), flush=True)


# -- results ------------------------------------------------------------------------------
def read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def read_run(run: Path) -> Optional[dict]:
    """A finished run's result (metrics.json of a training run, eval.json of scratch), budget and seconds."""
    done = read_json(run / "done.json")
    if done is None:
        return None
    result = read_json(run / "metrics.json") or read_json(run / "eval.json")
    budget = (read_json(run / "budget.json") or {}).get("total", {})
    return {"result": result, "budget": budget, "seconds": done["seconds"],
            "zero_shot_all": read_json(run / ZERO_SHOT / "eval.json")}


def arm_budget(fold: str, arm: str, runs: dict) -> dict:
    """Images and seconds an arm consumed: a staged arm adds its erm run's budget to its own."""
    own = runs[fold, arm]["budget"] if runs.get((fold, arm)) else {}
    if arm not in STAGED or not runs.get((fold, BASE)):
        return dict(own)
    base = runs[fold, BASE]["budget"]
    return {key: base.get(key, 0) + own.get(key, 0) for key in dict.fromkeys([*base, *own])}  # in a fixed order


def summary(run: dict, fold: str) -> dict:
    """What the tables show of one run on its held-out set: dataset-level foreground Dice."""
    d = DatasetResult.from_dict(run["result"]["datasets"][fold])
    out = {"zero_shot": d.zero_shot.get("fg_dice"), "shots": {}, "curve": d.curve.to_dict() if d.curve else None,
           "tune": (run["result"].get("tune") or {}).get("chosen")}
    if run.get("zero_shot_all"):
        z = DatasetResult.from_dict(run["zero_shot_all"]["datasets"][fold])
        out["zero_shot_all"] = {"fg_dice": z.zero_shot.get("fg_dice"), "images": z.scored}
    for k, shot in d.adapted.items():
        dice = shot.get("fg_dice")
        out["shots"][str(k)] = {"mean": dice.mean, "ci95": dice.ci95, "per_episode": shot.values("fg_dice")}
    return out


def paired(a: Optional[dict], b: Optional[dict]) -> Optional[Estimate]:
    """The paired difference a - b (``summary.paired_difference``) of two table cells of results.json:
    every arm draws the same seeded episodes, so their per-episode values pair up."""
    return paired_difference((a or {}).get("per_episode"), (b or {}).get("per_episode"))


def diff_cell(d: Optional[Estimate]) -> str:
    """A paired difference, bold where the interval excludes 0."""
    if d is None:
        return "–"
    text = f"{d.mean:+.3f} ± {d.ci95:.3f}"
    return f"**{text}**" if abs(d.mean) > d.ci95 else text


def cell(stats: Optional[dict]) -> str:
    return f"{stats['mean']:.3f} ± {stats['ci95']:.3f}" if stats else "–"


def curve_at(s: dict, k: str, steps: str) -> Optional[dict]:
    return ((s.get("curve") or {}).get("shots", {}).get(k) or {}).get(steps)


def section(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    """A results.md section: its title line, a blank line, the table."""
    return [title, "", *markdown_table(header, rows)]


def tables(out: Path, folds: list[str], arms: list[str], k: str = "5") -> str:
    runs = {(f, a): read_run(out / f / a) for f in folds for a in arms}
    record = {f"{f}/{a}": {**summary(r, f), "budget": arm_budget(f, a, runs), "seconds": r["seconds"]}
              for (f, a), r in runs.items() if r is not None}
    (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    head = ["arm", *folds]

    def at(arm: str, fold: str) -> dict:
        return record.get(f"{fold}/{arm}") or {}

    lines = section(f"### Held-out {k}-shot foreground Dice, adaptation tuned on validation tasks (dataset-level, "
                    f"mean ± 95% CI over episodes)", head,
                    [[a, *[cell(at(a, f).get("shots", {}).get(k)) for f in folds]] for a in arms])
    lines += ["", *section(f"### {BASE} zero-shot foreground Dice on every held-out image (dataset-level, "
                           f"half-overlapping windows, whole image: no field-of-view mask)", head,
                           [[BASE, *[f"{z['fg_dice']:.3f} ({z['images']} images)"
                                     if (z := at(BASE, f).get("zero_shot_all")) else "–" for f in folds]]])]
    lines += ["", *section("### Zero-shot foreground Dice in the protocol (its first eval.max_images held-out images)",
                           head, [[a, *[f"{at(a, f)['zero_shot']:.3f}" if at(a, f) else "–" for f in folds]]
                                  for a in arms])]
    for steps in ("0", "1", "10"):
        title = (f"### {k}-shot Dice after {steps} adaptation step(s) (adaptation curve"
                 + ("; 0: the same queries unadapted)" if steps == "0" else ")"))
        lines += ["", *section(title, head, [[a, *[cell(curve_at(at(a, f), k, steps)) for f in folds]] for a in arms])]
    lines += ["", *section(f"### Gain of adaptation: {k}-shot at the tuned steps minus the same queries unadapted "
                           "(paired over episodes; bold: the interval excludes 0)", head,
                           [[a, *[diff_cell(paired(at(a, f).get("shots", {}).get(k), curve_at(at(a, f), k, "0")))
                                  for f in folds]] for a in arms])]
    def tuned(shots: str):
        """An arm's ``shots``-shot score at its tuned steps, a cell of results.json."""
        return lambda arm, fold: at(arm, fold).get("shots", {}).get(shots)

    def against(base: str, title: str, score) -> list[str]:
        """A section of paired differences: each other arm's ``score`` minus ``base``'s, episode by episode."""
        return ["", *section(f"{title} (paired; bold: the interval excludes 0)", head,
                             [[a, *[diff_cell(paired(score(a, f), score(base, f))) for f in folds]]
                              for a in arms if a != base])]

    lines += against(BASE, f"### Against {BASE}: {k}-shot Dice minus {BASE}'s on the same episodes, at each arm's "
                           "tuned steps", tuned(k))
    for steps in ("1", "10"):
        lines += against(BASE, f"### Against {BASE}: {k}-shot Dice minus {BASE}'s on the same episodes, after "
                               f"{steps} adaptation step(s)", lambda a, f, steps=steps: curve_at(at(a, f), k, steps))
    for shots in sorted({s for r in record.values() for s in r.get("shots", {}) if s != k}, key=int):
        # where an arm wins: every k, at the tuned steps
        lines += against(BASE, f"### Against {BASE} at k = {shots}: {shots}-shot Dice minus {BASE}'s on the same "
                               "episodes, at each arm's tuned steps", tuned(shots))
    if "scratch" in arms:  # what the training mix is worth at all: every arm against a random init
        lines += against("scratch", f"### Against scratch: {k}-shot Dice minus a random initialisation's on the "
                                    "same episodes, at each arm's tuned steps", tuned(k))
    budget_rows = []
    for key, r in record.items():
        b, t = r["budget"], r["tune"] or {}
        f, a = key.split("/")
        budget_rows.append([f, a, b.get("outer_steps", 0), b.get("forward_images", 0),
                            f"{b.get('train_seconds', 0):.0f}", f"{r['seconds']:.0f}",
                            f"{t.get('adapt_lr')}, {t.get('adapt_steps')}"])
    lines += ["", *section("### Budget (staged arms include their erm run) and chosen adaptation",
                           ["fold", "arm", "outer steps", "forward images", "train s", "run s", "tuned α, steps"],
                           budget_rows)]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    (out / "summary.md").write_text(summary_table(out, folds, arms, k))  # the README's short table
    return text


def summary_table(out: Path, folds: list[str], arms: list[str], k: str = "5") -> str:
    """The README's short summary: rows arms, columns folds, k-shot Dice at the tuned steps with
    its CI, then the best arm after 1 and after 10 adaptation steps (curve), from results.json."""
    record = json.loads((out / "results.json").read_text())
    short = {"retina_drive": "DRIVE", "retina_stare": "STARE", "retina_chasedb1": "CHASE", "polyp_kvasir_seg": "polyps"}
    rows = []
    if BASE in arms:
        rows.append([f"{BASE}, zero-shot (every image)", *[
            f"{z['fg_dice']:.3f}" if (z := (record.get(f"{f}/{BASE}") or {}).get("zero_shot_all")) else "–"
            for f in folds]])
    for a in arms:
        rows.append([f"{a}, {k}-shot (tuned steps)",
                     *[cell((record.get(f"{f}/{a}") or {}).get("shots", {}).get(k)) for f in folds]])
    for steps in ("1", "10"):
        cells = []
        for f in folds:
            scored = [(s["mean"], a) for a in arms if (s := curve_at(record.get(f"{f}/{a}") or {}, k, steps))]
            cells.append(f"{max(scored)[1]} {max(scored)[0]:.3f}" if scored else "–")
        rows.append([f"best arm, {k}-shot after {steps} step{'s' if steps != '1' else ''}", *cells])
    return "\n".join(markdown_table(["arm", *[short.get(f, f) for f in folds]], rows)) + "\n"


def plot_curves(out: Path, folds: list[str], arms: list[str], k: str = "5") -> Optional[Path]:
    """Per fold: k-shot Dice against adaptation steps (left), and Dice against k at the tuned
    steps (right, the protocol's table); one line per arm, with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record = json.loads((out / "results.json").read_text())
    have = [f for f in folds if any(f"{f}/{a}" in record and record[f"{f}/{a}"].get("curve") for a in arms)]
    if not have:
        return None
    fig, axes = plt.subplots(len(have), 2, figsize=(10, 3.2 * len(have)), squeeze=False)
    for row, fold in zip(axes, have):
        for arm in arms:
            curve = (record.get(f"{fold}/{arm}") or {}).get("curve")
            if not curve:
                continue
            by_k = curve["shots"]
            if k in by_k:
                steps = sorted(by_k[k], key=int)
                x = [max(int(s), 0.5) for s in steps]  # 0 steps drawn at 0.5 on the log axis
                m = [by_k[k][s]["mean"] for s in steps]
                c = [by_k[k][s]["ci95"] for s in steps]
                row[0].plot(x, m, marker="o", label=arm)
                row[0].fill_between(x, [a - b for a, b in zip(m, c)], [a + b for a, b in zip(m, c)], alpha=0.15)
            table = record[f"{fold}/{arm}"]["shots"]  # every k of eval.shots at the tuned steps
            ks = sorted(table, key=int)
            zero = by_k.get(k, {}).get("0") or {"mean": record[f"{fold}/{arm}"]["zero_shot"], "ci95": 0.0}
            row[1].errorbar([0, *map(int, ks)], [zero["mean"], *[table[q]["mean"] for q in ks]],
                            yerr=[zero["ci95"], *[table[q]["ci95"] for q in ks]], marker="o", capsize=3, label=arm)
        row[0].set(xscale="log", xlabel=f"adaptation steps ({k}-shot; 0 drawn at 0.5)", ylabel="foreground Dice",
                   title=f"held out: {fold}")
        row[1].set(xlabel=f"shots k (tuned steps; 0: the {k}-shot queries unadapted)",
                   ylabel="foreground Dice", title=fold)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_learning(out: Path, folds: list[str], tag: str = "val/zero_shot_fg_dice") -> Optional[Path]:
    """erm's learning curve per fold: the validation tasks' zero-shot Dice (training sites only),
    read from the run's tensorboard events."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for fold in folds:
        tb = out / fold / BASE / "tb"
        if not tb.is_dir():
            continue
        events = EventAccumulator(str(tb))
        events.Reload()
        if tag not in events.Tags().get("scalars", []):
            continue
        points = events.Scalars(tag)
        ax.plot([p.step for p in points], [p.value for p in points], marker=".", label=f"held out {fold}")
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel="outer step", ylabel="zero-shot foreground Dice",
           title="erm: validation tasks of the training sets (mean),\nnever the held-out set")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "learning.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/study", help="study folder (runs, results.md, figures)")
    parser.add_argument("--folds", nargs="+", default=FOLDS, choices=FOLDS, help="held-out datasets")
    parser.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    parser.add_argument("--data-root", default="../shared/data", help="folder holding the datasets")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each with --threads torch threads)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--experiment", default="converged", help="the erm runs' (and scratch's) experiment")
    parser.add_argument("--meta-experiment", default="converged_meta",
                        help="the meta stages' experiment; on a GPU: [converged_gpu,meta_stage]")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    parser.add_argument("--set-meta", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for the meta stages and erm_more only")
    parser.add_argument("--shots", default="5", help="the k of the tables and the steps panel of curves.png")
    parser.add_argument("--tables-only", action="store_true", help="rebuild tables and figures from finished runs")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not args.tables_only:
        run_study(args)
        print(f"study wall time {time.perf_counter() - t0:.0f} s", flush=True)
    print(tables(out, args.folds, args.arms, args.shots))
    for path in (plot_curves(out, args.folds, args.arms, args.shots), plot_learning(out, args.folds)):
        if path is not None:
            print(f"wrote {path}")
    unfinished = [f"{f}/{a}" for f in args.folds for a in args.arms if not (out / f / a / "done.json").exists()]
    if unfinished and not args.tables_only:
        print(f"unfinished runs: {', '.join(unfinished)} (see their log.txt); rerun to resume them", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
