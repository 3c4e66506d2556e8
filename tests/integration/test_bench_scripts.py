"""The performance tools as run: scripts/bench_meta_step.py (its rows, per-process memory, the grid,
the data path, iMAML) and gpu_check.sh's no-CUDA path. The meta.checkpoint_inner memory saver and
ANIL's reuse on the higher backend (identical meta-gradients): tests/unit/test_bench_scripts.py."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, load_script
from tests.helpers import SHARED_DATA as DATA  # ../shared/data, when present

BENCH = ROOT / "scripts" / "bench_meta_step.py"
SMALL = ["--threads", "1", "--depth", "3", "--size", "32", "--inner-steps", "1", "--reps", "1"]
ROW = re.compile(r"^\| (\S+) \| ([\d.]+) \(([\d.]+)-([\d.]+)\) \| ([\d.]+) \| ([\d.]+|-) \| (\d+|-) \| ([\d.]+|-) \|$")


def bench(*args, timeout=600):
    out = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=timeout,
                         cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def grid(tmp_path, algorithm: str, size: int, ks: list[str]):
    """``--grid`` for one algorithm on the func backend beside plain steps, one thread and rep: its printed
    tables and its JSON rows by (configuration, K)."""
    stdout = bench("--grid", "--threads", "1", "--depth", "3", "--grid-sizes", str(size), "--grid-k", *ks,
                   "--reps", "1", "--algorithms", algorithm, "--backends", "func", "--json", str(tmp_path / "g.json"))
    return stdout, {(r["config"], r["k"]): r for r in json.loads((tmp_path / "g.json").read_text())["rows"]}


def rows_of(stdout):
    return {m.group(1): m.groups()[1:] for m in map(ROW.match, stdout.splitlines()) if m}


FLOORS = {"plain", "raw_higher", "raw_higher_fo", "raw_func"}


def check_ratios(stdout, json_path, expected):
    """Every configuration's row, its seconds from the JSON, and its two ratios recomputed from them."""
    rows = rows_of(stdout)
    assert set(rows) == expected, stdout
    data = {r["config"]: r for r in json.loads(json_path.read_text())["rows"]}
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


def test_bench_prints_a_ratio_row_per_configuration_and_times_imaml_with_its_options(tmp_path, monkeypatch, capsys):
    """A first-order algorithm (its floor: raw_higher_fo) and iMAML on request (its options passed on),
    on both backends, at 16 px; every algorithm of the default set at 32 px: the slow test below. The
    script's main in this process (its timings need no fresh one; its memory column does, below)."""
    args = [*SMALL, "--size", "16", "--algorithms", "fomaml", "imaml", "--backends", "higher", "func",
            "--no-memory", "--cg-steps", "2", "--imaml-lambda", "1.0", "--json", str(tmp_path / "b.json")]
    monkeypatch.setattr(sys, "argv", [str(BENCH), *args])
    threads = torch.get_num_threads()
    try:
        assert load_script("bench_meta_step").main(args) == 0
    finally:
        torch.set_num_threads(threads)  # --threads 1 set it for this process
    stdout = capsys.readouterr().out
    check_ratios(stdout, tmp_path / "b.json", FLOORS | {f"{a}/{b}" for a in ("fomaml", "imaml")
                                                        for b in ("higher", "func")})
    assert "--cg-steps 2" in stdout


@pytest.mark.slow  # ten configurations timed in one process: ~25 s on two idle cores
def test_bench_prints_a_ratio_row_for_every_algorithm_and_backend(tmp_path):
    stdout = bench(*SMALL, "--no-memory", "--json", str(tmp_path / "b.json"))
    check_ratios(stdout, tmp_path / "b.json", FLOORS | {f"{a}/{b}" for a in ("maml", "fomaml", "anil")
                                                        for b in ("higher", "func")})


@pytest.mark.slow  # a fresh process per configuration: ~45 s on two idle cores
def test_bench_memory_of_one_configuration_is_its_own_process_peak():
    """Peak memory comes from a fresh process per configuration: MAML keeps K steps' graphs and
    Adam's state, plain neither, so a fresh process must show MAML higher."""
    stdout = bench(*SMALL, "--inner-steps", "2", "--algorithms", "maml", "--backends", "func", "--no-floors")
    rows = rows_of(stdout)
    assert set(rows) == {"plain", "maml/func"}
    assert rows["plain"][6] == "1.00" and int(rows["maml/func"][5]) > int(rows["plain"][5])
    assert float(rows["maml/func"][6]) > 1.0


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
    stdout, rows = grid(tmp_path, "maml", 64, ["4", "1"])
    assert set(rows) == {(c, k) for c in ("plain", "maml/func") for k in (1, 4)}
    times, growth = stdout.split("Growth from K=1 to K=4")  # the grid's rows, then the growth table's
    printed = [line for line in times.splitlines() if line.startswith(("| plain |", "| maml/func |"))]
    assert [line.split(" | ")[2] for line in printed] == ["1", "1", "4", "4"]  # K in increasing order
    assert "| maml/func | 64 |" in growth
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


@pytest.mark.slow  # two processes at 32 px: ~30 s on two idle cores
def test_bench_grid_shows_imaml_memory_flat_in_k(tmp_path):
    stdout, rows = grid(tmp_path, "imaml", 32, ["1", "6"])
    assert set(rows) == {(c, k) for c in ("plain", "imaml/func") for k in (1, 6)}
    # no graph through the inner steps: six steps keep what one keeps (second-order MAML: ~30 MiB more per step)
    assert rows["imaml/func", 6]["peak_bytes"] < rows["imaml/func", 1]["peak_bytes"] + 10 * 2**20
    assert "Growth from K=1 to K=6" in stdout and "| imaml/func | 32 |" in stdout
