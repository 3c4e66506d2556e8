"""Every command in the README runs as written, at smoke size (slow): step counts, episodes and
images shrunk by appended overrides, data from ``../shared/data``; it must exit 0 with its outputs
written, or stop with its documented message. Tests that need ``../shared/data`` skip without it.
That each composes and sets up (seconds): tests/unit/test_readme_commands.py.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Optional

import pytest
import torch

from tests.helpers import BIN, ROOT, SHARED_DATA
from tests.readme import (METASEG, PROGRAMS, compose_job, compose_on_shared_data, hydra_free, nproc,
                          on_shared_data, plugin_missing, substitute, sweep)


# -- slow: every README command runs at smoke size ----------------------------------------------
def smoke(config: str, cfg, given: set[str], out: Path, multirun: bool) -> list[str]:
    """Overrides that shrink a run of ``cfg`` to seconds; keys the command sets itself stay, except
    the sizes (steps, episodes, images) and where it writes."""
    o: dict[str, str] = {}
    e = cfg.get("eval")
    if config == "train":
        o.update({"trainer.max_steps": "2", "trainer.eval_every": "0", "trainer.ckpt_every": "1",
                  "trainer.log_every": "1", "trainer.monitor_tasks": "0", "trainer.device": "cpu",
                  "trainer.threads": "1"})
        if cfg.pretrain.steps:
            o["pretrain.steps"] = "1"
        if cfg.meta.inner_steps > 1 and "meta.inner_steps" not in given:
            o["meta.inner_steps"] = "1"
    if config in ("train", "eval") and e is not None:
        if config == "eval":
            o["device"] = "cpu"
        if e.episodes:
            o["eval.episodes"] = "1"
        o.update({"eval.max_images": "2", "eval.pictures": "1"})
        if e.adapt_steps:
            o["eval.adapt_steps"] = "1"
        if e.val_episodes:
            o["eval.val_episodes"] = "1"
        if e.curve_steps:
            o["eval.curve_steps"] = "[0,1]"
        if e.tune:
            o.update({"eval.tune_steps": "[1]", "eval.tune_lrs": f"[{e.tune_lrs[0]}]", "eval.tune_episodes": "1"})
        if e.mode == "slide":
            o["eval.stride"] = "64"
    if config == "predict":
        o.update({"device": "cpu", "workers": "1"})
        if cfg.support is not None:  # zero-shot prediction refuses adaptation settings
            o["adapt.steps"] = "1"
    if config == "data_cmd":
        o["samples"] = "1"
    if cfg.get("data") is not None:
        o["data.workers"] = "2"
        if on_shared_data(cfg.data):
            o["data.root"] = str(SHARED_DATA)
    if config != "predict":
        o["hydra.sweep.dir" if multirun else "hydra.run.dir"] = str(out)
    return [f"{k}={v}" for k, v in o.items()]


def run(argv: list[str], cwd: Path, env: Optional[dict] = None, timeout: int = 1200):
    full_env = {**os.environ, **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.fixture(scope="module")
def default_checkpoint(tmp_path_factory) -> Path:
    """The default job (``metaseg-train`` with no arguments) at smoke size: CKPT of the README."""
    run_dir = tmp_path_factory.mktemp("default_job")
    cfg = compose_job("train", [])
    out = run([str(BIN / "metaseg-train"), *smoke("train", cfg, set(), run_dir, False)], cwd=run_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir / "checkpoints" / "best.pt"


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory) -> Path:
    """A finished sweep folder for ``metaseg-report``."""
    root = tmp_path_factory.mktemp("sweep")
    out = run([str(BIN / "metaseg-train"), "-m", "experiment=smoke", "trainer.max_steps=1", "trainer.device=cpu",
               "seed=0,1", f"hydra.sweep.dir={root}"], cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("cmd", METASEG, ids=str)
def test_readme_command_runs(cmd, request, tmp_path):
    places, readme_conf = request.getfixturevalue("places"), request.getfixturevalue("readme_conf")
    if "CKPT" in cmd.text:
        places["CKPT"] = str(request.getfixturevalue("default_checkpoint"))
    if "DATE/TIME" in cmd.text:
        places["outputs/multirun/DATE/TIME"] = str(request.getfixturevalue("smoke_sweep"))
    args = substitute(cmd.args, places)
    if cmd.kind == "script":
        out = run([str(BIN / "python"), str(ROOT / cmd.argv[1]), "--help"], cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        flags = [a.split("=")[0] for a in args if a.startswith("--")]
        assert all(f in out.stdout for f in flags), (flags, out.stdout)
        return
    if cmd.kind == "metaseg-report":
        out = run([str(BIN / "metaseg-report"), *args], cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        assert (Path(args[0]) / "report.md").is_file()
        return
    problem = plugin_missing(args)
    if problem:
        pytest.skip(problem)
    config = PROGRAMS[cmd.program]
    multirun = "-m" in args
    first = [*hydra_free(sweep(args)[0] if multirun else args), *readme_conf]
    if cmd.stops:
        out = run([str(BIN / cmd.program), *args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
        assert out.returncode != 0 and cmd.stops in out.stderr, out.stderr[-3000:]
        return
    cfg = compose_on_shared_data(config, first, cwd=tmp_path)
    given = {a.split("=", 1)[0] for a in args if "=" in a}
    target = tmp_path / ("sweep" if multirun else "run")
    extra = [*smoke(config, cfg, given, target, multirun), *readme_conf]
    env = dict(cmd.env)
    if cmd.kind == "torchrun":
        gpu = "trainer.device=cpu" not in args
        if gpu and torch.cuda.device_count() < nproc(cmd):
            pytest.skip(f"needs {nproc(cmd)} GPUs")
        if gpu:
            extra = [x for x in extra if not x.startswith("trainer.device=")]
        env["OMP_NUM_THREADS"] = "1"
        argv = [str(BIN / "torchrun"), *cmd.argv[1:cmd.argv.index("-m") + 2], *args, *extra]
    else:
        argv = [str(BIN / cmd.program), *args, *extra]
    out = run(argv, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    if config == "train":
        runs = sorted(target.glob("*/metrics.json")) if multirun else [target / "metrics.json"]
        assert runs and all(json.loads(r.read_text())["objective"] is not None for r in runs)
        assert len(runs) == (len(sweep(args)) if multirun else 1)
    elif config == "eval":
        assert (target / "eval.json").is_file()
    elif config == "predict":
        result = json.loads((Path(places["OUT"]) / "predict.json").read_text())
        assert len(list((Path(places["OUT"]) / "masks").glob("*.png"))) == 8, result
    else:
        assert (target / "summary.json").is_file()
