#!/usr/bin/env python
"""How far each algorithm's bf16 / fp16 meta-gradient is from fp32, on one task (CPU autocast by default).

The model and task are those of tests/unit/test_algorithms_precision.py: a U-Net (ResNet-18 cut
at stride 8, decoder 16-8-8) with 4 classes and 4 + 4 generated 32 px images of synthetic
domain 1. fp16 uses an inner loss scale of 256 (``--scale``). For each algorithm and mode
it prints the relative error of the loss, and of the gradient (all meta-learned tensors
concatenated): relative L2 error, cosine with fp32 and norm ratio. The tests' tolerances
are set from these numbers.

    python scripts/algo_precision.py                 # K = 1, all algorithms
    python scripts/algo_precision.py --inner-steps 2 --algorithms maml anil
"""

from __future__ import annotations

import argparse
import sys

import torch

from metaseg.config import ModelConfig
from metaseg.data.synthetic import synthetic_task
from metaseg.meta import ALGORITHMS, Precision
from metaseg.models import build_model
from metaseg.utils.tables import markdown_table

SMALL = ModelConfig(extra={"encoder_depth": 3, "decoder_channels": [16, 8, 8]})




def meta_grad(name, precision, steps, device):
    torch.manual_seed(0)
    model = build_model(SMALL, 4).to(device)
    support, query = [tuple(t.to(device) for t in b) for b in synthetic_task()]
    learner = ALGORITHMS[name](model, inner_lr=0.05, inner_steps=steps, precision=precision)
    loss = learner.outer_loss(support, query)
    (loss * precision.scale).backward()
    return loss.item(), torch.cat([p.grad.flatten() / precision.scale for p in learner.parameters()])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS))
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--scale", type=float, default=256.0, help="fp16 inner loss scale (default: %(default)s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"# K={a.inner_steps}, {a.device}, torch {torch.__version__}")
    header = ["algorithm", "mode", "loss rel. error", "grad rel. error", "cosine", "norm ratio"]
    print("\n".join(markdown_table(header, [])))  # then a row as each is measured
    for name in a.algorithms:
        l32, g32 = meta_grad(name, Precision("32", torch.device(a.device).type), a.inner_steps, a.device)
        for mode in ("bf16", "16"):
            lm, gm = meta_grad(name, Precision(mode, torch.device(a.device).type, init_scale=a.scale),
                               a.inner_steps, a.device)
            rel = float((gm - g32).norm() / g32.norm())
            cos = float((gm * g32).sum() / gm.norm() / g32.norm())
            row = [name, mode, f"{abs(lm - l32) / abs(l32):.4f}", f"{rel:.3f}", f"{cos:.3f}",
                   f"{float(gm.norm() / g32.norm()):.3f}"]
            print(markdown_table(header, [row])[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
