"""Meta-training throughput (tasks per second) for 1, 2, ... processes under torchrun.

Each measurement is a real ``torchrun --nproc_per_node=N -m metaseg.train`` run (rendezvous on
127.0.0.1 at a free port) with the global ``meta.meta_batch`` fixed, so N processes share the
same tasks per step; tasks/s is read from the run's tensorboard scalar
``train/tasks_per_second`` at the last step (the outer loop only: no start-up, no final
evaluation). On the CPU every process gets ``--threads`` torch threads; the speed-up is
bounded by the cores the machine really has free.

    python scripts/bench_distributed.py --procs 1 2 --steps 6 --meta-batch 4
    python scripts/bench_distributed.py --device cuda --procs 1 --steps 10 --meta-batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tasks_per_second(run: Path) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    return float(acc.Scalars("train/tasks_per_second")[-1].value)


def bench(procs: int, args, out: Path) -> dict:
    run = out / f"np{procs}_{args.device}"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "metaseg.train",
           f"experiment={args.experiment}", f"trainer.device={args.device}", f"meta.meta_batch={args.meta_batch}",
           f"meta={args.meta}", f"data.size={args.size}", f"trainer.max_steps={args.steps}", "trainer.log_every=1",
           "trainer.eval_every=0", f"trainer.ckpt_every={args.steps}", "trainer.monitor_tasks=0",
           "eval.shots=0", "eval.episodes=0", "eval.max_images=1", "eval.pictures=0",
           "trainer.best_metric=mean.zero_shot_miou", f"hydra.run.dir={run}", *args.overrides]
    if args.device == "cpu":
        cmd.append(f"trainer.threads={args.threads}")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "GLOO_SOCKET_IFNAME": os.environ.get(
        "GLOO_SOCKET_IFNAME", "lo")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench_distributed: {procs} processes failed:\n{done.stderr[-3000:]}")
    return {"procs": procs, "device": args.device, "meta_batch": args.meta_batch, "steps": args.steps,
            "tasks_per_second": tasks_per_second(run)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts to measure")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: one GPU per process (nccl)")
    p.add_argument("--steps", type=int, default=6, help="outer steps per run")
    p.add_argument("--meta-batch", type=int, default=4, help="global tasks per outer step")
    p.add_argument("--meta", default="maml", help="algorithm config (conf/meta)")
    p.add_argument("--size", type=int, default=32, help="image side (data.size)")
    p.add_argument("--experiment", default="smoke")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    p.add_argument("--out", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("overrides", nargs="*", help="extra metaseg-train overrides")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        rows = [bench(n, args, out) for n in args.procs]
    base = rows[0]["tasks_per_second"] / rows[0]["procs"]
    print(f"{'procs':>5} {'device':>6} {'tasks/s':>8} {'speed-up':>8} {'efficiency':>10}")
    for r in rows:
        r["speedup"] = r["tasks_per_second"] / rows[0]["tasks_per_second"]
        r["efficiency"] = r["tasks_per_second"] / (base * r["procs"])
        print(f"{r['procs']:>5} {r['device']:>6} {r['tasks_per_second']:>8.2f} {r['speedup']:>8.2f} "
              f"{r['efficiency']:>10.0%}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
