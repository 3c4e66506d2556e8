"""Mixed precision for every algorithm: meta-gradients in bf16 and fp16 close to fp32 (CPU autocast).

MAML itself is covered by tests/unit/test_precision.py, training in every precision on a CUDA
device by tests/integration/test_cuda_training.py. Stated tolerances, measured on this model
and task with K = 1 (see BENCHMARKS.md, "Algorithm zoo"): the gradient's cosine with fp32
> 0.9 (bf16) / > 0.95 (fp16), its norm within 20% / 10%, the loss within 2% / 1%. A missing
unscale of the fp16 inner gradients would miss the norm by the scale factor (256).
"""

import copy

import pytest
import torch

from metaseg.data.synthetic import synthetic_task
from metaseg.meta import ALGORITHMS, MAML, Precision
from metaseg.models import build_model
from tests.helpers import SMALL_UNET as SMALL
from tests.helpers import close, fp16_on_cpu, one_step

OTHERS = ["fomaml", "anil", "metasgd", "reptile", "mldg", "erm"]
TOL = {"bf16": {"cos": 0.9, "ratio": 0.2, "loss": 0.02}, "16": {"cos": 0.95, "ratio": 0.1, "loss": 0.01}}


def meta_grad(name, precision):
    torch.manual_seed(0)
    model = build_model(SMALL, 4)
    support, query = synthetic_task()
    learner = ALGORITHMS[name](model, inner_lr=0.05, inner_steps=1, precision=precision)
    loss = learner.outer_loss(support, query)
    (loss * precision.scale).backward()  # what GradScaler does to the outer loss
    return loss.item(), torch.cat([p.grad.flatten() / precision.scale for p in learner.parameters()])


@pytest.mark.parametrize("name", OTHERS)
def test_low_precision_meta_gradient_close_to_fp32(name):
    l32, g32 = meta_grad(name, Precision("32"))
    for mode in ("bf16", "16") if fp16_on_cpu() else ("bf16",):
        lm, gm = meta_grad(name, Precision(mode, init_scale=256.0))
        _, cos, ratio = close(gm, g32)
        assert torch.isfinite(gm).all()
        assert abs(lm - l32) < TOL[mode]["loss"] * abs(l32), (mode, lm, l32)
        assert cos > TOL[mode]["cos"] and abs(ratio - 1) < TOL[mode]["ratio"], (mode, cos, ratio)


@pytest.mark.parametrize("name", ["maml", *OTHERS])
def test_fp16_meta_step_with_grad_scaler_follows_fp32(name):
    if not fp16_on_cpu():
        pytest.skip("this torch has no fp16 autocast on CPU")
    d32, _, _, _ = one_step(name, "32")
    d16, stats, _, scaler = one_step(name, "16")
    assert torch.isfinite(d16).all() and d16.norm() > 0
    _, cos, ratio = close(d16, d32)
    assert cos > 0.95 and abs(ratio - 1) < 0.1, (cos, ratio)
    assert stats["loss_scale"] == scaler.get_scale() and stats["tasks_skipped"] == 0


def test_fp16_overflow_skips_the_step_and_lowers_the_scale_without_counting_divergence():
    if not fp16_on_cpu():
        pytest.skip("this torch has no fp16 autocast on CPU")
    d, stats, learner, scaler = one_step("maml", "16", scale=2.0**40)
    assert torch.count_nonzero(d) == 0  # theta untouched
    assert scaler.get_scale() == 2.0**39  # GradScaler backed off
    assert learner.guard.in_a_row == 0 and learner.guard.total == 0


def test_bf16_adapt_is_close_to_fp32():
    torch.manual_seed(0)
    model = build_model(SMALL, 4)
    support, _ = synthetic_task()
    a32 = MAML(model, inner_lr=0.05, inner_steps=2).adapt(*support)
    abf = MAML(copy.deepcopy(model), inner_lr=0.05, inner_steps=2, precision=Precision("bf16")).adapt(*support)
    with torch.no_grad():
        d32 = torch.cat([(a - p).flatten() for a, p in zip(a32.parameters(), model.parameters())])
        dbf = torch.cat([(a - p).flatten() for a, p in zip(abf.parameters(), model.parameters())])
    assert close(dbf, d32)[1] > 0.9
