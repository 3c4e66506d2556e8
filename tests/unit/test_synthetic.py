"""The embedded default mix: deterministic, shape-defined classes, distinct domains."""

import torch

from metaseg.data import TaskSampler, build_mix
from metaseg.data.synthetic import CLASSES, STYLES, render
from tests.helpers import compose_cfg


def test_render_is_a_pure_function_of_seed_domain_index():
    a = render(0, 2, 7, 48)
    b = render(0, 2, 7, 48)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(render(1, 2, 7, 48)[0], a[0])
    assert not torch.equal(render(0, 2, 8, 48)[0], a[0])


def test_label_space_and_shapes():
    seen = set()
    for i in range(20):
        image, mask = render(0, 0, i, 64)
        assert image.shape == (3, 64, 64) and mask.shape == (64, 64) and mask.dtype == torch.int64
        assert 0.0 <= image.min() and image.max() <= 1.0
        seen |= set(mask.unique().tolist())
    assert seen == set(range(len(CLASSES)))


def test_at_least_six_domains_that_look_different():
    assert len(STYLES) >= 6
    # polarity differs between domains: foreground brighter than background in some, darker in others
    signs = set()
    for d in range(6):
        diffs = []
        for i in range(10):
            img, mask = render(0, d, i, 64)
            gray = img.mean(0)
            diffs.append(float(gray[mask > 0].mean() - gray[mask == 0].mean()))
        signs.add(sum(diffs) > 0)
    assert signs == {True, False}


def test_default_mix_and_sampler_are_reproducible():
    cfg = compose_cfg("train", ["experiment=smoke"])
    mix = build_mix(cfg.data)
    assert list(mix.train) == ["synth_0", "synth_1", "synth_2", "synth_3"]
    assert list(mix.heldout) == ["synth_4", "synth_5"]
    s1 = TaskSampler(mix.train, mix.weights, 2, 2, seed=3)
    s2 = TaskSampler(mix.train, mix.weights, 2, 2, seed=3)
    for _ in range(5):
        t1, t2 = s1.sample(), s2.sample()
        assert t1.dataset == t2.dataset and torch.equal(t1.support[0], t2.support[0])
        # support and query never share an image
        for q in t1.query[0]:
            assert not any(torch.equal(q, s) for s in t1.support[0])
    state = s1.state_dict()
    nxt = s1.sample()
    s1.load_state_dict(state)
    assert torch.equal(s1.sample().query[0], nxt.query[0])
