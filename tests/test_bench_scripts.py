"""The performance tools: bench_meta_step.py, the meta.checkpoint_inner memory saver, ANIL's
reuse on the higher backend, and gpu_check.sh's no-CUDA path."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from metaseg.config import ModelConfig
from metaseg.data.synthetic import synthetic_task
from metaseg.meta import ALGORITHMS, ANIL, MAML, Precision
from metaseg.meta.from_config import make_learner, validate_meta
from metaseg.models import build_model
from metaseg.utils.errors import ConfigError
from tests.conftest import ROOT
from tests.data_fixtures import SHARED_DATA as DATA  # ../shared/data, when present
from tests.test_meta_gradient import task, tiny_net

BENCH = ROOT / "scripts" / "bench_meta_step.py"
SMALL = ["--threads", "1", "--depth", "3", "--size", "32", "--inner-steps", "1", "--reps", "1"]
ROW = re.compile(r"^\| (\S+) \| ([\d.]+) \(([\d.]+)-([\d.]+)\) \| ([\d.]+) \| ([\d.]+|-) \| (\d+|-) \| ([\d.]+|-) \|$")


def bench(*args, timeout=600):
    out = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=timeout,
                         cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def rows_of(stdout):
    return {m.group(1): m.groups()[1:] for m in map(ROW.match, stdout.splitlines()) if m}


def test_bench_prints_a_ratio_row_for_every_algorithm_and_backend(tmp_path):
    stdout = bench(*SMALL, "--no-memory", "--json", str(tmp_path / "b.json"))
    rows = rows_of(stdout)
    expected = {"plain", "raw_higher", "raw_higher_fo", "raw_func"} | {f"{a}/{b}" for a in ("maml", "fomaml", "anil")
                                                           for b in ("higher", "func")}
    assert set(rows) == expected, stdout
    data = {r["config"]: r for r in json.loads((tmp_path / "b.json").read_text())["rows"]}
    plain, raw, raw_fo = (data[n]["seconds"] for n in ("plain", "raw_higher", "raw_higher_fo"))
    for name, (med, lo, hi, vs_plain, vs_raw, peak, mem) in rows.items():
        s = data[name]["seconds"]
        assert s > 0 and float(lo) <= float(med) <= float(hi)
        assert float(vs_plain) == pytest.approx(s / plain, abs=0.006)  # printed with 2 decimals
        floor = raw_fo if name.startswith(("fomaml", "raw_higher_fo")) else raw
        assert float(vs_raw) == pytest.approx(s / floor, abs=0.006)
        assert peak == "-" and mem == "-"  # --no-memory
    assert rows["plain"][3] == "1.00" and rows["raw_higher"][4] == "1.00"
    assert "# command: python scripts/bench_meta_step.py" in stdout and "Targets (the step-cost goals):" in stdout


def test_bench_memory_of_one_configuration_is_its_own_process_peak():
    """Peak memory comes from a fresh process per configuration: MAML keeps K steps' graphs and
    Adam's state, plain neither, so a fresh process must show MAML higher."""
    stdout = bench(*SMALL, "--inner-steps", "2", "--algorithms", "maml", "--backends", "func", "--no-floors")
    rows = rows_of(stdout)
    assert set(rows) == {"plain", "maml/func"}
    assert rows["plain"][6] == "1.00" and int(rows["maml/func"][5]) > int(rows["plain"][5])
    assert float(rows["maml/func"][6]) > 1.0


@pytest.mark.parametrize("backend", ["higher", "func"])
@pytest.mark.parametrize("algorithm,extra", [("maml", {}), ("anil", {"inner_params": ["3", "6"]}),
                                             ("metasgd", {}), ("maml", {"multi_step_loss": True})])
def test_checkpoint_inner_gives_identical_meta_gradients(backend, algorithm, extra):
    support, query = task()
    out = {}
    for ckpt in (False, True):
        model = tiny_net()
        learner = ALGORITHMS[algorithm](model, inner_lr=0.2, inner_steps=3, backend=backend,
                                       checkpoint_inner=ckpt, **extra)
        loss = learner.outer_loss(support, query)
        loss.backward()
        out[ckpt] = (loss.detach(), [p.grad.clone() for p in learner.parameters()], dict(learner.last_stats))
    (l0, g0, s0), (l1, g1, s1) = out[False], out[True]
    assert torch.equal(l0, l1) and s0 == s1
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-15) for a, b in zip(g0, g1))
    assert any(float(g.abs().max()) > 1e-6 for g in g0)  # there is a gradient to compare


def test_checkpoint_inner_on_smp_unet_matches_without():
    support, query = [(x.double(), y) for x, y in synthetic_task(n=2)]
    grads = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_model(ModelConfig(extra={"encoder_depth": 3, "decoder_channels": [16, 8, 8]}), 4).double()
        MAML(model, inner_lr=0.05, inner_steps=2, checkpoint_inner=ckpt).outer_loss(support, query).backward()
        grads[ckpt] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert torch.allclose(grads[False], grads[True], rtol=1e-10, atol=1e-14)


def test_checkpoint_inner_is_refused_where_it_would_do_nothing(tiny_cfg):
    for overrides in (["meta=fomaml"], ["meta.first_order=true"], ["meta=reptile"], ["meta=mldg"]):
        cfg = tiny_cfg(*overrides, "meta.checkpoint_inner=true")
        with pytest.raises(ConfigError, match="meta.checkpoint_inner=true"):
            validate_meta(cfg.meta)
    cfg = tiny_cfg("meta=maml", "meta.checkpoint_inner=true")  # second order: allowed, and reaches the learner
    learner = make_learner(tiny_net(), cfg.meta, Precision())
    assert learner.checkpoint_inner and not make_learner(tiny_net(), tiny_cfg().meta, Precision()).checkpoint_inner
    validate_meta(tiny_cfg("meta=mamlpp", "meta.checkpoint_inner=true").meta)  # first order, then second


def test_anil_reuses_frozen_outputs_on_the_higher_backend_too():
    support, query = [(x.double(), y) for x, y in synthetic_task(n=2)]
    grads, calls = {}, []
    for backend, reuse in (("higher", True), ("higher", False), ("func", True)):
        torch.manual_seed(0)
        model = build_model(ModelConfig(extra={"encoder_depth": 3, "decoder_channels": [16, 8, 8]}), 4).double()
        learner = ANIL(model, inner_lr=0.1, inner_steps=3, backend=backend)
        if backend == "higher":
            fmodel = learner.inner.fmodel
            assert fmodel.encoder in learner.inner.frozen and fmodel.decoder.blocks[0] in learner.inner.frozen
            fmodel.encoder.conv1.register_forward_hook(lambda *a: calls.append(1))  # runs only when computed
            if not reuse:
                learner.inner.frozen = []
        calls.clear()
        learner.outer_loss(support, query).backward()
        if backend == "higher":
            # reused: the support batch once for all three inner steps, the query once; else 3 + 1
            assert len(calls) == (2 if reuse else 4)
            assert not any("forward" in vars(m) for m in fmodel.modules())  # the memo is gone after the task
        grads[backend, reuse] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert torch.allclose(grads["higher", True], grads["higher", False], rtol=1e-10, atol=1e-13)
    assert torch.allclose(grads["higher", True], grads["func", True], rtol=1e-10, atol=1e-13)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path taken without a CUDA device")
def test_gpu_check_without_cuda_exits_cleanly(tmp_path):
    out = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "gc")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "PY": sys.executable, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr
    assert "no CUDA device" in out.stdout and "nothing to check" in out.stdout
    assert not (tmp_path / "gc").exists()  # no half-written summary


@pytest.mark.slow  # three processes at 64 px: ~40 s on two idle cores
def test_bench_grid_rows_per_size_and_k_and_second_order_memory_grows_with_k(tmp_path):
    stdout = bench("--grid", "--threads", "1", "--depth", "3", "--grid-sizes", "64", "--grid-k", "4", "1",
                   "--reps", "1", "--algorithms", "maml", "--backends", "func", "--json", str(tmp_path / "g.json"))
    rows = {(r["config"], r["k"]): r for r in json.loads((tmp_path / "g.json").read_text())["rows"]}
    assert set(rows) == {(c, k) for c in ("plain", "maml/func") for k in (1, 4)}
    printed = [line for line in stdout.splitlines() if line.startswith(("| plain |", "| maml/func |"))]
    assert [line.split(" | ")[2] for line in printed] == ["1", "1", "4", "4"]  # K in increasing order
    assert all(line.split(" | ")[1] == "64" for line in printed)
    assert rows["maml/func", 4]["seconds"] > rows["maml/func", 1]["seconds"]
    # the unrolled graph of 4 steps holds ~4x the activations of 1 (hundreds of MiB at 64 px)
    assert rows["maml/func", 4]["peak_bytes"] > rows["maml/func", 1]["peak_bytes"] + 50 * 2**20


@pytest.mark.slow  # decodes the binary mix twice
@pytest.mark.skipif(not (DATA / "retina_drive").is_dir(), reason="real datasets not present")
def test_bench_data_path_replays_the_real_loaders_tasks(tmp_path):
    stdout = bench("--data-path", "--data-root", str(DATA), "--threads", "1", "--depth", "3", "--size", "32",
                   "--inner-steps", "1", "--reps", "1", "--json", str(tmp_path / "d.json"))
    result = json.loads((tmp_path / "d.json").read_text())
    assert result["same_weights"] is True  # the preloaded tasks are exactly the loader's
    assert set(result["seconds"]) == {"real loader", "preloaded"} and result["sample_seconds"] > 0
    assert "added by the loader:" in stdout and "same tasks and weights in both runs: True" in stdout


def test_bench_times_imaml_on_request_with_its_options():
    stdout = bench(*SMALL, "--algorithms", "imaml", "--backends", "func", "higher", "--no-floors", "--no-memory",
                   "--cg-steps", "2", "--imaml-lambda", "1.0")
    rows = rows_of(stdout)
    assert set(rows) == {"plain", "imaml/func", "imaml/higher"}, stdout
    assert float(rows["imaml/func"][3]) > 0 and "--cg-steps 2" in stdout


@pytest.mark.slow  # two processes at 32 px: ~30 s on two idle cores
def test_bench_grid_shows_imaml_memory_flat_in_k(tmp_path):
    stdout = bench("--grid", "--threads", "1", "--depth", "3", "--grid-sizes", "32", "--grid-k", "1", "6",
                   "--reps", "1", "--algorithms", "imaml", "--backends", "func", "--json", str(tmp_path / "g.json"))
    rows = {(r["config"], r["k"]): r for r in json.loads((tmp_path / "g.json").read_text())["rows"]}
    assert set(rows) == {(c, k) for c in ("plain", "imaml/func") for k in (1, 6)}
    # no graph through the inner steps: six steps keep what one keeps (second-order MAML: ~30 MiB more per step)
    assert rows["imaml/func", 6]["peak_bytes"] < rows["imaml/func", 1]["peak_bytes"] + 10 * 2**20
    assert "Growth from K=1 to K=6" in stdout and "| imaml/func | 32 |" in stdout
