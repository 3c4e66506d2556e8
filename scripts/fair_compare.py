"""Compare the algorithms fairly on the generated mix: equal budgets, adaptation tuned on validation tasks.

Arms, each a ``metaseg-train`` run in ``--out/ARM`` followed by ``metaseg-eval`` of its
``best.pt`` (selected on validation tasks) in ``--out/ARM/eval``:

* ``maml``, ``fomaml``, ``anil``, ``metasgd``, ``erm``: ``meta=ARM`` for ``--steps`` outer steps;
* ``two_stage``: ``experiment=two_stage``, ``--steps // 2`` erm steps, then the rest maml steps
  from the erm stage's ``best.pt`` (the two add up to ``--steps``);
* ``scratch``: ``metaseg-eval checkpoint=none``, a random init, adapted only.

Every arm ends with the same ``eval.tune`` selection: ``adapt_lr`` x ``adapt_steps`` from one grid
(``--lrs`` x ``--ksteps``), scored by k-shot mIoU on validation tasks of the training domains
(never the held-out ones), then the held-out domains are scored with the choice.

Both budget views:

* equal images processed: the arms above at the same outer-step count; the table shows the
  forward and backward images each spent (``budget.json``; erm makes maml's forward passes per
  step, second-order arms send their support batches back twice);
* equal wall time: every arm whose outer steps cost less than maml's gets a second run,
  ``ARM@time``, with its step count(s) scaled by ``maml seconds per step / ARM seconds per step``
  (two_stage: its erm and maml steps' mean cost; both stages scaled alike). The costs are
  measured side by side before any ``@time`` run, in one process with one thread: each trained
  algorithm at this study's settings takes one outer step in turn for ``--cost-rounds`` rounds,
  the median is kept (``costs.json``; ``scripts/step_cost.py``). The arms' own training
  times are not used: run one after another, or two beside each other, they measure the
  machine's load as much as the algorithm. Step counts, not a time limit: the ``@time`` run
  stays reproducible.

Resumable: an arm whose folder holds a finished ``eval/eval.json`` is not rerun (``--force``
redoes it); a half-trained arm continues from its ``last.pt`` (``trainer.resume=auto``). An arm
folder made with other settings stops the script rather than mixing two studies (each arm's
overrides are in ``ARM/arm.json``, its log in ``ARM/run.log``). ``--jobs 1`` runs everything in
this process; ``--jobs 2`` runs two arms at a time in two worker processes (one torch thread
each, torch imported once per worker); ``@time`` arms start once maml and their own arm are
finished. Writes ``table.md`` and ``table.json`` (rows, settings, what ran and what was reused).

The defaults (300 steps, 32 px, below) are sized for about 20-25 minutes with ``--jobs 2`` on
two free CPU cores (BENCHMARKS.md, "Fair comparison"):

    OMP_NUM_THREADS=1 python scripts/fair_compare.py --jobs 2 --out outputs/fair
    python scripts/fair_compare.py --steps 2 --override data.size=32 meta.inner_steps=1 --out /tmp/f
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from metaseg.engine.evaluation.results import Results
from metaseg.utils.tables import markdown_table

log = logging.getLogger("fair_compare")

TRAINED = ("maml", "fomaml", "anil", "metasgd", "erm", "two_stage")
ARMS = (*TRAINED, "scratch")
TIME = "@time"
SPEC = "arm.json"
COSTS = "costs.json"
# The full comparison's default sizes: 32 px generated mix (120 images per training domain, 24 of
# them validation; 40 per held-out domain); K = 3, 2 tasks of 4 + 4 images per outer step.
DEFAULT_OVERRIDES = [
    "data.size=32",
    *[f"data.datasets.synth_{i}.num_images=120" for i in range(4)],
    *[f"data.datasets.synth_{i}.num_images=40" for i in (4, 5)],
]
# keys a scratch evaluation (metaseg-eval checkpoint=none) takes from --override; a checkpoint's
# evaluation takes only eval.* and seed (the rest comes from its checkpoint)
SCRATCH_KEYS = ("data", "model", "meta", "eval", "seed")
CHECKPOINT_KEYS = ("eval", "seed")


class StudyError(Exception):
    """A study folder that does not fit the requested comparison; the message says what to do."""


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0].split(".", 1)[0]


def _fmt(x: float) -> str:
    return f"{x:g}"


@dataclass
class Settings:
    out: Path
    steps: int
    episodes: int
    val_episodes: int
    tune_episodes: int
    lrs: list[float]
    ksteps: list[int]
    fixed: tuple[float, int]
    shots: int
    evals: int
    seed: int
    overrides: list[str] = field(default_factory=list)

    def grid(self) -> tuple[list[float], list[int]]:
        """The tuning grid, with the fixed default setting in it (its score is read from the grid)."""
        lrs = sorted({*self.lrs, self.fixed[0]})
        ks = sorted({*self.ksteps, self.fixed[1]})
        return lrs, ks

    def eval_overrides(self) -> list[str]:
        """The shared evaluation of every arm; no random-init baseline inside runs (the scratch arm is it)."""
        lrs, ks = self.grid()
        return [f"eval.shots={self.shots}", f"eval.episodes={self.episodes}", f"eval.val_episodes={self.val_episodes}",
                "eval.pictures=0", "eval.baseline=false", "eval.tune=true",
                f"eval.tune_lrs=[{','.join(map(_fmt, lrs))}]", f"eval.tune_steps=[{','.join(map(str, ks))}]",
                f"eval.tune_episodes={self.tune_episodes}", f"seed={self.seed}"]

    def train_overrides(self, arm: str, steps: int, first: Optional[int] = None) -> list[str]:
        """``metaseg-train`` overrides of a trained arm at ``steps`` outer steps (two_stage: ``first`` erm
        steps, then ``steps``)."""
        every = max(math.ceil(steps / max(self.evals, 1)), 1)  # each stage of two_stage evaluates as often
        algo = ["experiment=two_stage", f"pretrain.steps={first}"] if arm == "two_stage" else [f"meta={arm}"]
        # training's evaluations only feed best.pt (validation tasks): no tuning, one held-out episode
        # (the reported held-out scores come from the evaluation of best.pt)
        ev = [o for o in self.eval_overrides() if not o.startswith(("eval.tune", "eval.episodes="))]
        ev += ["eval.tune=false", "eval.episodes=1"]
        return [*algo, f"trainer.max_steps={steps}", f"trainer.eval_every={every}", f"trainer.ckpt_every={every}",
                "trainer.device=cpu", "trainer.threads=1", "trainer.monitor_tasks=0", "trainer.resume=auto", *ev,
                *DEFAULT_OVERRIDES, *self.overrides]


@dataclass
class Job:
    name: str  # arm, or ARM@time
    arm: str
    deps: tuple[str, ...] = ()


def cost_algorithms(arms: list[str]) -> list[str]:
    """The algorithms whose seconds per step the ``@time`` runs of ``arms`` need (maml first)."""
    need = {"maml"}
    for arm in arms:
        if arm in TRAINED:
            need |= {"erm", "maml"} if arm == "two_stage" else {arm}
    return ["maml", *sorted(need - {"maml"})]


def arm_steps(arm: str, steps: int) -> tuple[int, Optional[int]]:
    """(``trainer.max_steps``, ``pretrain.steps``) of an arm at ``steps`` outer steps in all."""
    if arm == "two_stage":
        first = steps // 2
        return steps - first, first
    return steps, None


def time_steps(arm: str, steps: int, maml_train_s: float, arm_train_s: float) -> Optional[tuple[int, Optional[int]]]:
    """The ``@time`` run's step counts: ``steps`` scaled by maml's seconds for ``steps`` steps over the
    arm's; None when the arm was not cheaper (no more steps fit in maml's time)."""
    if not (arm_train_s > 0 and maml_train_s > 0):
        return None
    factor = maml_train_s / arm_train_s
    main, first = arm_steps(arm, steps)
    scaled = (max(round(main * factor), 1), None if first is None else max(round(first * factor), 1))
    return scaled if sum(s or 0 for s in scaled) > steps else None


class Study:
    """The arms' runs in ``settings.out``: what to run, what is finished, and the table."""

    def __init__(self, settings: Settings, force: bool = False):
        self.s = settings
        self.force = force

    # ---- folders and specs
    def folder(self, name: str) -> Path:
        return self.s.out / name.replace("@", "_at_")

    def finished(self, name: str) -> bool:
        d = self.folder(name)
        done = (d / "eval" / "eval.json").is_file()
        return done and (name == "scratch" or ((d / "metrics.json").is_file() and (d / "budget.json").is_file()))

    def read_spec(self, name: str) -> Optional[dict]:
        return read_json(self.folder(name) / SPEC)

    def claim(self, name: str, spec: dict, derived_steps: bool) -> Optional[dict]:
        """Prepare ``name``'s folder; the spec to run (an unfinished run's own), or None when finished (reused)."""
        d = self.folder(name)
        if self.force and d.exists():
            shutil.rmtree(d)
        old = self.read_spec(name)
        if old is not None and not _same(old, spec, derived_steps):
            raise StudyError(f"{d} holds a run with other settings ({_diff(old, spec)}); pass --force to redo it, "
                             f"or another --out")
        if old is not None and self.finished(name):
            log.info("%s: finished in %s, reusing it (--force redoes it)", name, d)
            return None
        if d.exists() and old is None and any(d.iterdir()):
            raise StudyError(f"{d} is not empty and holds no {SPEC}: move it away, or pass --force")
        d.mkdir(parents=True, exist_ok=True)
        if old is None:
            _write_json(d / SPEC, spec)
        return old or spec

    # ---- what each run gets
    def eval_overrides(self, name: str) -> list[str]:
        if name == "scratch":
            extra = [o for o in [*DEFAULT_OVERRIDES, *self.s.overrides] if _key(o) in SCRATCH_KEYS]
            return ["checkpoint=none", "data=synthetic", "device=cpu", *self.s.eval_overrides(), *extra]
        extra = [o for o in self.s.overrides if _key(o) in CHECKPOINT_KEYS]
        return [f"checkpoint={self.folder(name) / 'checkpoints' / 'best.pt'}", "device=cpu",
                *self.s.eval_overrides(), *extra]

    def spec(self, job: Job, timed_steps: bool = True) -> Optional[dict]:
        """The overrides of ``job``'s runs (None: an @time run that is not needed); ``timed_steps=False``:
        an @time run's at the base step count (to compare everything but its derived steps)."""
        if job.arm == "scratch":
            return {"arm": "scratch", "eval": self.eval_overrides("scratch")}
        main, first = arm_steps(job.arm, self.s.steps)
        if job.name.endswith(TIME) and timed_steps:
            steps = self.time_budget(job.arm)
            if steps is None:
                return None
            main, first = steps
        return {"arm": job.arm, "train": self.s.train_overrides(job.arm, main, first),
                "eval": self.eval_overrides(job.name)}

    def time_budget(self, arm: str) -> Optional[tuple[int, Optional[int]]]:
        costs = (read_json(self.s.out / COSTS) or {}).get("seconds", {})
        algos = cost_algorithms([arm])
        if any(a not in costs for a in algos):
            raise StudyError(f"{arm}{TIME} needs the seconds per step of {', '.join(algos)} in {self.s.out / COSTS}: "
                             f"run the script without --no-time to measure them")
        main, first = arm_steps(arm, self.s.steps)
        own = main * costs["maml" if arm == "two_stage" else arm] + (first or 0) * costs.get("erm", 0.0)
        return time_steps(arm, self.s.steps, self.s.steps * costs["maml"], own)

    def measure_costs(self, arms: list[str], rounds: int) -> dict:
        """Seconds per outer step of the trained ``arms``' algorithms (and maml's), measured side by side
        at this study's settings: ``costs.json`` is reused while it holds them all at these settings,
        else they are all measured again together (never mixed with an earlier sitting's figures)."""
        algos = cost_algorithms(arms)
        overrides = {a: self.s.train_overrides(a, self.s.steps) for a in algos}
        path = self.s.out / COSTS
        old = read_json(path)
        if old is not None and all(old["overrides"].get(a) == o for a, o in overrides.items()):
            return old
        from step_cost import median_seconds, prepare  # scripts/step_cost.py

        log.info("measuring seconds per outer step of %s side by side (%d rounds)", ", ".join(algos), rounds)
        runners = {a: prepare(compose_config("train", o)) for a, o in overrides.items()}
        out = {"rounds": rounds, "threads": 1, "seconds": median_seconds(runners, rounds), "overrides": overrides}
        self.s.out.mkdir(parents=True, exist_ok=True)
        _write_json(path, out)
        log.info("seconds per outer step: %s", ", ".join(f"{a} {s:.3f}" for a, s in out["seconds"].items()))
        return out

    def jobs(self, arms: list[str], with_time: bool) -> list[Job]:
        out = [Job(a, a) for a in arms]
        if with_time:
            out += [Job(a + TIME, a, deps=("maml", a)) for a in arms if a in TRAINED and a != "maml"]
        return out

    def check(self, jobs: list[Job]) -> None:
        """Before anything runs: the overrides compose (a typo stops here), and every arm folder that
        exists was made with these settings (or --force)."""
        for job in jobs:
            spec = self.spec(job, timed_steps=False)
            try:
                for kind, name in (("train", "train"), ("eval", "eval")):
                    if kind in spec:
                        compose_config(name, spec[kind])
            except Exception as exc:  # noqa: BLE001 - Hydra's override and schema errors
                raise StudyError(f"{job.name}: the overrides do not compose: {str(exc).splitlines()[0]}") from exc
            old = None if self.force else self.read_spec(job.name)
            if old is not None and not _same(old, spec, job.name.endswith(TIME)):
                raise StudyError(f"{self.folder(job.name)} holds a run with other settings ({_diff(old, spec)}); "
                                 f"pass --force to redo it, or another --out")

    # ---- running
    def run_job(self, job: Job) -> str:
        """Train (unless trained) and evaluate ``job`` in this process; returns ran | reused | not needed."""
        spec = self.spec(job)
        if spec is None:
            log.info("%s: %s trained no faster than maml, no equal-time run", job.name, job.arm)
            return "not needed"
        spec = self.claim(job.name, spec, derived_steps=job.name.endswith(TIME))
        if spec is None:
            return "reused"
        d = self.folder(job.name)
        t0 = time.perf_counter()
        with run_log(d / "run.log"):
            if "train" in spec and not (d / "metrics.json").is_file():
                log.info("%s: training (%s)", job.name, " ".join(o for o in spec["train"] if "steps=" in o))
                from metaseg.engine.training.trainer import train
                train(compose_config("train", spec["train"]), d)
            log.info("%s: tuning adaptation on validation tasks, then scoring the held-out domains", job.name)
            from metaseg.engine.evaluation.checkpoint_eval import evaluate_checkpoint
            evaluate_checkpoint(compose_config("eval", spec["eval"]), d / "eval")
        log.info("%s: done in %.0f s", job.name, time.perf_counter() - t0)
        return "ran"

    def run(self, jobs: list[Job], parallel: int) -> dict[str, str]:
        """Run ``jobs``, each after its dependencies: in this process (``parallel`` 1) or in ``parallel``
        worker processes (each imports torch once and runs arm after arm). Returns name -> outcome."""
        if parallel <= 1:
            outcome = {}
            for job in jobs:
                if any(outcome.get(d, "ran") not in ("ran", "reused", "not needed") for d in job.deps):
                    outcome[job.name] = "skipped"
                    continue
                outcome[job.name] = self._attempt(lambda: self.run_job(job), job)
            return outcome
        import multiprocessing

        outcome: dict[str, str] = {}
        pending = list(jobs)
        names = {j.name for j in jobs}
        running: dict[Future, Job] = {}
        with ProcessPoolExecutor(parallel, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init) as pool:
            while pending or running:
                for job in list(pending):
                    if len(running) >= parallel:
                        break
                    deps = [d for d in job.deps if d in names]
                    if any(outcome.get(d, "ran") not in ("ran", "reused", "not needed") for d in deps):
                        outcome[job.name] = "skipped"
                        pending.remove(job)
                    elif all(d in outcome for d in deps):
                        pending.remove(job)
                        running[pool.submit(_run_job, self.s, self.force, job)] = job
                if not running:
                    if pending:
                        raise StudyError(f"cannot order {[j.name for j in pending]}: a dependency never runs")
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    job = running.pop(fut)
                    outcome[job.name] = self._attempt(fut.result, job)
        return outcome

    @staticmethod
    def _attempt(fn, job: Job) -> str:
        try:
            return fn()
        except StudyError:
            raise
        except Exception as exc:  # noqa: BLE001 - one failed arm does not stop the others
            log.error("%s failed: %s: %s", job.name, type(exc).__name__, exc)
            return f"failed: {type(exc).__name__}: {exc}"

    # ---- the table
    def rows(self) -> list[dict]:
        out = []
        for arm in ARMS:
            for name in (arm, arm + TIME):
                if self.finished(name):
                    out.append(table_row(name, self.folder(name), self.s.fixed))
        return out


def compose_config(name: str, overrides: list[str]):
    """``conf/NAME.yaml`` with ``overrides``, as ``metaseg-train`` / ``metaseg-eval`` compose it."""
    from hydra import compose, initialize_config_module

    import metaseg.config  # noqa: F401 - registers the schemas

    with initialize_config_module(config_module="metaseg.conf", version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


@contextmanager
def run_log(path: Path):
    """metaseg's log lines of one arm go to ``path`` (the console shows only this script's)."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _setup_logging() -> None:
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    if any(getattr(h, "fair_compare", False) for h in root.handlers):  # main() called again (tests)
        return
    console = logging.StreamHandler()
    console.fair_compare = True
    console.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    console.addFilter(logging.Filter(log.name))
    root.addHandler(console)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _worker_init() -> None:
    _setup_logging()
    import torch

    torch.set_num_threads(1)


def _run_job(settings: Settings, force: bool, job: Job) -> str:
    """A worker process's job (module level: picklable)."""
    return Study(settings, force).run_job(job)


def _same(old: dict, new: dict, derived_steps: bool) -> bool:
    if not derived_steps:
        return old == new

    def strip(spec: dict) -> dict:
        return {k: [o for o in v if not o.startswith(("trainer.max_steps=", "pretrain.steps=", "trainer.eval_every=",
                                                      "trainer.ckpt_every="))] if isinstance(v, list) else v
                for k, v in spec.items()}
    return strip(old) == strip(new)


def _diff(old: dict, new: dict) -> str:
    parts = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a != b:
            if isinstance(a, list) and isinstance(b, list):
                parts.append(f"{key}: was {sorted(set(a) - set(b))}, now {sorted(set(b) - set(a))}")
            else:
                parts.append(f"{key}: was {a}, now {b}")
    return "; ".join(parts)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def table_row(name: str, folder: Path, fixed: tuple[float, int]) -> dict:
    """One row: the budget (``budget.json``), the tuning record and held-out scores (``eval/eval.json``)."""
    ev = read_json(folder / "eval" / "eval.json")
    budget = (read_json(folder / "budget.json") or {}).get("total", {})
    tune = ev["tune"]
    fixed_score = next((r["score"] for r in tune["grid"] if r["adapt_lr"] is not None
                        and math.isclose(r["adapt_lr"], fixed[0]) and r["adapt_steps"] == fixed[1]), float("nan"))
    results = Results.from_dict(ev)
    held = {n: {"mean": d.first.get("miou").mean, "ci95": d.first.get("miou").ci95}
            for n, d in results.datasets.items()}
    steps = int(budget.get("outer_steps", 0))
    return {"arm": name, "outer_steps": steps, "forward_images": int(budget.get("forward_images", 0)),
            "backward_images": int(budget.get("backward_images", 0)),
            "train_s": float(budget.get("train_seconds", 0.0)), "total_s": float(budget.get("seconds", 0.0)),
            "s_per_step": float(budget["train_seconds"]) / steps if steps else None,
            "chosen": tune["chosen"], "shots": tune["shots"], "val_fixed": fixed_score, "val_tuned": tune["score"],
            "heldout": held, "heldout_mean": float(results.mean["adapted_miou"])}


def markdown(rows: list[dict], fixed: tuple[float, int], costs: Optional[dict] = None) -> str:
    if not rows:
        return "(no finished arm)"
    names = list(rows[0]["heldout"])
    k = rows[0]["shots"]
    head = ["arm", "outer steps", "fwd images", "bwd images", "train s", "s / step", "total s", "tuned α, K",
            f"val {k}-shot mIoU at α={_fmt(fixed[0])}, K={fixed[1]}", "val tuned",
            *[f"{n} {k}-shot mIoU" for n in names], "held-out mean"]
    body = []
    for r in rows:
        lr = r["chosen"]["adapt_lr"]
        cells = [r["arm"], str(r["outer_steps"]), str(r["forward_images"]), str(r["backward_images"]),
                 f"{r['train_s']:.0f}", "-" if r["s_per_step"] is None else f"{r['s_per_step']:.2f}",
                 f"{r['total_s']:.0f}", f"{'learned' if lr is None else _fmt(lr)}, {r['chosen']['adapt_steps']}",
                 f"{r['val_fixed']:.3f}", f"{r['val_tuned']:.3f}",
                 *[f"{r['heldout'][n]['mean']:.3f} ± {r['heldout'][n]['ci95']:.3f}" for n in names],
                 f"{r['heldout_mean']:.3f}"]
        body.append(cells)
    lines = markdown_table(head, body)
    if costs:
        lines += ["", f"Seconds per outer step, measured side by side ({costs['rounds']} rounds, one thread; they set "
                      f"the @time step counts): " + ", ".join(f"{a} {s:.3f}" for a, s in costs["seconds"].items())]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/fair", help="study folder: one subfolder per arm, table.md, table.json")
    p.add_argument("--steps", type=int, default=300, help="outer steps of every trained arm (two_stage: split in two)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS, help="arms to run (default: all)")
    p.add_argument("--no-time", action="store_true", help="skip the equal-wall-time ARM@time runs")
    p.add_argument("--cost-rounds", type=int, default=10,
                   help="rounds of the side-by-side timing that sets the @time step counts (costs.json)")
    p.add_argument("--jobs", type=int, default=1, help="arms run at a time, each its own process with one thread")
    p.add_argument("--episodes", type=int, default=10, help="held-out episodes per domain (mean ± 95%% CI over them)")
    p.add_argument("--val-episodes", type=int, default=2, help="validation episodes per training domain (best.pt)")
    p.add_argument("--tune-episodes", type=int, default=2, help="validation episodes per domain per grid point")
    p.add_argument("--lrs", type=float, nargs="+", default=[0.03, 0.1, 0.3], help="eval.tune_lrs")
    p.add_argument("--ksteps", type=int, nargs="+", default=[3, 10], help="eval.tune_steps")
    p.add_argument("--fixed", nargs=2, metavar=("ALPHA", "K"), default=["0.1", "3"],
                   help="the fixed default adaptation whose validation score is reported (added to the grid)")
    p.add_argument("--shots", type=int, default=5, help="k of the k-shot scores (tuning and held out)")
    p.add_argument("--evals", type=int, default=3, help="validation evaluations during training (best.pt candidates)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--override", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="Hydra overrides for every run (data.*, model.*, meta.*, eval.* also reach scratch; "
                        "a checkpoint's evaluation takes eval.* only)")
    p.add_argument("--force", action="store_true", help="redo the selected arms even if finished")
    p.add_argument("--table-only", action="store_true", help="only (re)write the table from finished arms")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    _worker_init()
    fixed = (float(args.fixed[0]), int(args.fixed[1]))
    settings = Settings(out=Path(args.out).resolve(), steps=args.steps, episodes=args.episodes,
                        val_episodes=args.val_episodes, tune_episodes=args.tune_episodes, lrs=args.lrs,
                        ksteps=args.ksteps, fixed=fixed, shots=args.shots, evals=args.evals, seed=args.seed,
                        overrides=list(args.override))
    if args.steps < 1:
        print(f"{Path(sys.argv[0]).name}: error: --steps={args.steps} must be >= 1", file=sys.stderr)
        return 2
    study = Study(settings, force=args.force)
    outcome: dict[str, str] = {}
    if not args.table_only:
        # maml first: every @time arm waits for its timing; then the slowest arms, so two jobs end together
        order = [a for a in ("maml", "metasgd", "two_stage", "fomaml", "erm", "anil", "scratch") if a in args.arms]
        jobs = study.jobs(order, with_time=not args.no_time)
        try:
            study.check(jobs)
            timed = [j.arm for j in jobs if j.name.endswith(TIME)]
            if timed:  # before any run, so nothing else of this study is on the CPU; reused once measured
                study.measure_costs(timed, args.cost_rounds)
            outcome = study.run(jobs, args.jobs)
        except StudyError as exc:
            print(f"{Path(sys.argv[0]).name}: error: {exc}", file=sys.stderr)
            return 2
    rows = study.rows()
    costs = read_json(settings.out / COSTS)
    text = markdown(rows, fixed, costs)
    settings.out.mkdir(parents=True, exist_ok=True)
    (settings.out / "table.md").write_text(text + "\n")
    _write_json(settings.out / "table.json", {"settings": {**vars(args), "fixed": list(fixed)}, "rows": rows,
                                              "costs": costs and costs["seconds"], "outcome": outcome})
    print(text)
    failed = {n: o for n, o in outcome.items() if o.startswith("failed") or o == "skipped"}
    for n, o in failed.items():
        print(f"{n}: {o}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
