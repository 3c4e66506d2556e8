"""scripts/probe_meta_gradient.py: second- against first-order meta-gradients, checked by finite differences."""

import math

import pytest
import torch

from tests.helpers import compose_cfg, load_script

probe = load_script("probe_meta_gradient")

TINY = ["experiment=smoke", "data.size=32", "meta.shots=2", "meta.query=2", "meta.inner_steps=2", "meta.inner_lr=0.1",
        "model.extra.decoder_channels=[16,8,8]"]


def test_valid_radius_stops_at_the_first_disagreement():
    eps = [1e-8, 1e-6, 1e-4, 1e-2]
    assert probe.valid_radius(eps, [10.0, 10.5, 13.0, 10.0], 10.0) == 1e-6  # 1e-2 agrees again: not counted
    assert probe.valid_radius(eps, [50.0, 10.0, 10.0, 10.0], 10.0) == 0.0
    assert probe.valid_radius(eps, [10.0] * 4, 10.0) == 1e-2


def test_smooth_model_meta_gradient_matches_finite_differences(tmp_path):
    """In float64 the smooth network's exact meta-gradient is the adapted loss's slope over 1e-7..1e-5."""
    out = probe.main(["--float64", "--tasks", "2", "--eps", "1e-7", "1e-6", "1e-5", "--json", str(tmp_path / "p.json"),
                      "--", *TINY, "model.smooth=true"])
    assert out["valid_radius"] == pytest.approx(1e-5)
    g2 = out["tasks"][-1]["g2"]
    assert all(s == pytest.approx(g2, rel=0.01) for s in out["slopes"])
    for row in out["tasks"]:  # second order differs from first order: the comparison is not of one thing twice
        assert math.isfinite(row["cos"]) and row["cos"] < 0.999 and row["g1"] > 0
    assert (tmp_path / "p.json").read_text().count('"valid_radius"') == 1


def test_probe_gradients_are_the_learners_meta_gradients():
    """The probe's g2 is MAML.outer_loss's gradient: the finite difference of that very loss agrees."""
    cfg = compose_cfg("train", [*TINY, "model.smooth=true"])
    sampler, second, _ = probe.setup(cfg, torch.float64)
    t = probe.as_dtype(sampler.sample(), torch.float64)
    _, g = probe.meta_gradient(second, t)
    unit = [torch.randn_like(x) for x in g]  # a random direction: slope = <g, u> / |u|
    norm = math.sqrt(sum(float(u.pow(2).sum()) for u in unit))
    expected = sum(float((a * u).sum()) for a, u in zip(g, unit)) / norm
    (slope,) = probe.directional_slopes(second, t, unit, [1e-6])
    assert slope == pytest.approx(expected, rel=1e-3, abs=1e-6)
