"""torchrun-style meta-training over two gloo processes on the CPU equals one process.

Two processes with ``meta.meta_batch=4`` (two tasks each) must reach the weights one process
with ``meta.meta_batch=4`` reaches: the ranks draw the same global meta-batch and adapt
disjoint halves, and the gradients are summed before the one outer step.

"To float tolerance" needs care here: at these toy sizes (32 px, BatchNorm on two images) the
outer gradient is chaotic in the weights (a 1e-7 perturbation of theta changes the next
second-order MAML gradient by ~5e-2), and Adam turns last-bit differences of summing the four
task gradients in another order into +-beta steps on near-zero gradient entries. So MAML (both
inner-loop backends, Adam) is compared after one step, where the weights agree to ~2e-6 while
a wrong reduction (a rank's tasks lost, counted twice, or not averaged) moves them by ~beta =
1e-3; Reptile (outer SGD) after three steps, within 2% of the last step's size (measured:
0.3%).

The two processes are spawned once (``torch.multiprocessing``, rendezvous on 127.0.0.1 at
a free port, gloo on the loopback interface) and run every distributed case in one group,
so the suite pays the start-up of two interpreters once.

Slow: the two interpreters and their eight runs cost about 30 s of CPU (~15 s on two idle cores).
What the default suite keeps: how the task sampler shards a meta-batch and re-shards its state, and
a meta-batch smaller than the world (tests/unit/test_distributed.py); evaluation episodes split over
two ranks giving one process's curve (tests/unit/test_eval_curve.py).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from metaseg.data.mix import build_mix
from metaseg.engine import distributed
from metaseg.engine.evaluation.protocol import evaluate_heldout
from metaseg.engine.training.trainer import train
from metaseg.meta.from_config import make_learner
from metaseg.meta.precision import Precision
from metaseg.models.factory import build_model

from tests.helpers import compose_cfg

pytestmark = pytest.mark.slow

BASE = ["experiment=smoke", "trainer.device=cpu", "meta.meta_batch=4", "trainer.eval_every=0",
        "trainer.monitor_tasks=0", "eval.shots=0", "eval.episodes=0", "eval.pictures=0", "eval.max_images=2",
        "trainer.best_metric=mean.zero_shot_miou"]  # training cases: a token final evaluation
# constant epsilon: a shorter run is a prefix of a longer one (for the resume case)
REPTILE = ["meta=reptile", "meta.outer_lr_schedule=constant", "meta.outer_lr=0.1"]
EVAL = ["eval.shots=2", "eval.episodes=3", "eval.pictures=2", "eval.max_images=4"]
CASES = {  # name -> overrides of a fresh run
    "reptile": [*REPTILE, "trainer.max_steps=3"],
    "reptile_part": [*REPTILE, "trainer.max_steps=2"],
    "maml_higher": ["meta=maml", "meta.backend=higher", "trainer.max_steps=1"],
    "maml_func": ["meta=maml", "meta.backend=func", "trainer.max_steps=1"],
}


def _cfg(*overrides):
    return compose_cfg("train", [*BASE, *overrides])


def _weights(run) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, root: str) -> None:
    """One of torchrun's processes, by hand: the environment torchrun sets, then the real trainer."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        root_path = Path(root)
        _grad_sync_cases(rank, root_path)
        for name, overrides in CASES.items():
            train(_cfg(*overrides), root_path / ("two" if rank == 0 else "rank1") / name)
        # evaluation split over the ranks, on the one-process run's weights
        cfg = _cfg(*CASES["reptile"], *EVAL)
        mix = build_mix(cfg.data)
        model = build_model(cfg.model, mix.num_classes)
        model.load_state_dict(_weights(root_path / "one" / "reptile"))
        learner = make_learner(model, cfg.meta, Precision("32", "cpu"), max_steps=3, model_cfg=cfg.model)
        result = evaluate_heldout(learner, mix.heldout, mix.num_classes, cfg.eval, torch.device("cpu"), cfg.seed)
        if rank == 0:
            (root_path / "two" / "eval.json").write_text(json.dumps(result))
            (root_path / "two" / "eval_pictures.json").write_text(json.dumps(sorted(result.pictures)))
    finally:
        torch.distributed.destroy_process_group()


def _grad_sync_cases(rank: int, root: Path) -> None:
    """GradSync on hand-made gradients: a parameter with a gradient on one rank only, one on none."""
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(3)]
    params[0].grad = torch.full((3,), float(rank + 1))  # 1 and 2
    if rank == 1:
        params[1].grad = torch.tensor([1.0, 2.0, 3.0])
    sync = distributed.GradSync(bucket_mb=8 / 2**20)  # 8-byte buckets: several in flight at once
    used, drawn = sync.reduce(params, n_used=rank, n_tasks=2)
    out = {"used": used, "drawn": drawn, "grads": [None if p.grad is None else p.grad.tolist() for p in params]}
    (root / f"gradsync{rank}.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One-process reference runs here, then the same runs over two processes."""
    root = tmp_path_factory.mktemp("dist")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each worker: the same summation order in every process
    try:
        for name in ("reptile", "maml_higher", "maml_func"):
            train(_cfg(*CASES[name]), root / "one" / name)
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_worker, args=(2, _free_port(), str(root)), nprocs=2, join=True)
    return root


def _reptile_tolerance(runs) -> float:
    """2% of how far the third step moved the weights: summation-order noise grows to ~0.3% of it
    by then (chaotic toy model); a lost or doubled task changes the step by tens of percent."""
    return 0.02 * _max_diff(_weights(runs / "two" / "reptile"), _weights(runs / "two" / "reptile_part"))


def test_two_processes_reach_the_weights_of_one(runs):
    one, two = runs / "one", runs / "two"
    for name in ("maml_higher", "maml_func"):  # one Adam step of ~beta = 1e-3 per weight
        d = _max_diff(_weights(one / name), _weights(two / name))
        assert d < 2e-5, (name, d)
    assert _max_diff(_weights(one / "maml_higher"), _weights(two / "reptile")) > 1e-4  # the check can fail
    d, tol = _max_diff(_weights(one / "reptile"), _weights(two / "reptile")), _reptile_tolerance(runs)
    assert 0 < tol and d < tol, (d, tol)


def test_grad_sync_sums_gradients_and_counts_over_ranks(runs):
    for rank in (0, 1):
        out = json.loads((runs / f"gradsync{rank}.json").read_text())
        assert (out["used"], out["drawn"]) == (1, 4)
        assert out["grads"] == [[3.0, 3.0, 3.0], [1.0, 2.0, 3.0], None]  # rank 0 had no grad for the 2nd: zeros


def test_resume_with_another_world_size_reshards(runs, tmp_path):
    """Two processes for two steps, then one process resumes its checkpoint for the third."""
    part = runs / "two" / "reptile_part"
    cfg = _cfg(*CASES["reptile"], f"trainer.resume={part / 'checkpoints' / 'last.pt'}")
    train(cfg, tmp_path / "resumed")
    d, tol = _max_diff(_weights(runs / "one" / "reptile"), _weights(tmp_path / "resumed")), _reptile_tolerance(runs)
    assert d < tol, (d, tol)


def test_evaluation_split_over_ranks_gives_the_one_process_numbers(runs):
    """Every episode is computed on one rank and gathered in order: the numbers are exactly one process's."""
    cfg = _cfg(*CASES["reptile"], *EVAL)
    mix = build_mix(cfg.data)
    model = build_model(cfg.model, mix.num_classes)
    model.load_state_dict(_weights(runs / "one" / "reptile"))
    learner = make_learner(model, cfg.meta, Precision("32", "cpu"), max_steps=3, model_cfg=cfg.model)
    one = json.loads(json.dumps(evaluate_heldout(learner, mix.heldout, mix.num_classes, cfg.eval,
                                                 torch.device("cpu"), cfg.seed)))
    two = json.loads((runs / "two" / "eval.json").read_text())
    assert two == one
    assert json.loads((runs / "two" / "eval_pictures.json").read_text()) == ["synth_4", "synth_5"]  # rank 0's grids
    assert [len(r["adapted"]["per_episode"]) for r in two["datasets"].values()] == [3, 3]  # 2 + 1 per rank


def test_only_rank_zero_writes(runs):
    """Rank 1 was handed another folder: it takes rank 0's and writes nothing there or anywhere."""
    assert not (runs / "rank1").exists()
    for name in CASES:
        run = runs / "two" / name
        assert {p.name for p in run.iterdir()} >= {"checkpoints", "tb", "metrics.json", "timing.json"}
        assert len(list((run / "tb").glob("events.*"))) == 1  # one tensorboard writer
        assert json.loads((run / "timing.json").read_text())["processes"] == 2


def test_torchrun_command_line(tmp_path):
    """The documented command: torchrun -m metaseg.train, two gloo processes on 127.0.0.1."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "metaseg.train", *BASE,
           *CASES["maml_higher"], f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "timing.json").read_text())["processes"] == 2
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["baseline"]["datasets"].keys() == metrics["datasets"].keys()  # as typed: with the baseline
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
