"""The held-out protocol: seeded episodes, every k from the same theta, summaries, scoring, sliding window."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from metaseg.data.tasks import collate
from metaseg.engine.evaluation.protocol import evaluate_dataset, score
from metaseg.engine.evaluation.settings import validate_eval
from metaseg.engine.evaluation.scoring import predictions, slide, window_starts
from metaseg.meta import MAML
from metaseg.metrics import mean_ci95
from metaseg.utils.errors import ConfigError
from tests.helpers import CPU, FullRes, TinyNet, as_json, compose_cfg, eval_cfg, make_learner, synthetic_heldout

# ``heldout`` (tests/conftest.py): a synthetic held-out domain of 12 images at 32 px


def test_episodes_are_reproducible_distinct_and_nested(heldout):
    learner = make_learner()
    a = evaluate_dataset(learner, "synth_4", heldout, 4, eval_cfg(), CPU, seed=0)
    b = evaluate_dataset(learner, "synth_4", heldout, 4, eval_cfg(), CPU, seed=0)
    assert as_json(a) == as_json(b)  # same seed, same numbers
    one, two = a["adapted"]["1"]["per_episode"], a["adapted"]["2"]["per_episode"]
    supports = [tuple(ep["support"]) for ep in two]
    assert len(set(supports)) == 3  # every episode draws its own support set
    assert all(o["support"] == t["support"][:1] for o, t in zip(one, two))  # 1-shot inside 2-shot support
    assert a["adapted"]["1"]["scored"] == a["adapted"]["2"]["scored"] == 12 - 2  # same query for every k
    assert len({ep["miou"] for ep in two}) == 3  # different supports, different scores
    c = evaluate_dataset(learner, "synth_4", heldout, 4, eval_cfg(), CPU, seed=1)
    assert [tuple(ep["support"]) for ep in c["adapted"]["2"]["per_episode"]] != supports
    d = evaluate_dataset(learner, "synth_5", heldout, 4, eval_cfg(), CPU, seed=0)  # the name seeds too
    assert [tuple(ep["support"]) for ep in d["adapted"]["2"]["per_episode"]] != supports


def test_every_k_and_episode_starts_from_the_same_theta(heldout):
    learner = make_learner()
    before = copy.deepcopy(learner.model.state_dict())
    both = evaluate_dataset(learner, "synth_4", heldout, 4, eval_cfg(shots=[1, 2]), CPU, seed=0)
    for name, tensor in learner.model.state_dict().items():
        assert torch.equal(tensor, before[name]), name  # theta untouched by adaptation
    alone = evaluate_dataset(learner, "synth_4", heldout, 4, eval_cfg(shots=[2]), CPU, seed=0)
    reordered = evaluate_dataset(learner, "synth_4", heldout, 4, eval_cfg(shots=[2, 1]), CPU, seed=0)
    # 2-shot numbers do not depend on which other k ran before them
    assert as_json(both["adapted"]["2"]) == as_json(alone["adapted"]["2"]) == as_json(reordered["adapted"]["2"])
    assert as_json(both["adapted"]["1"]) == as_json(reordered["adapted"]["1"])
    # the top-level adapted scores are the first k of the list (the eval.json contract)
    assert both["adapted"]["shots"] == 1 and both["adapted"]["miou"] == both["adapted"]["1"]["miou"]
    assert reordered["adapted"]["shots"] == 2 and reordered["adapted"]["miou"] == both["adapted"]["2"]["miou"]
    # and the adapted model is not theta: adaptation did something
    assert both["adapted"]["2"]["miou"]["mean"] != both["zero_shot"]["miou"]


def test_summary_is_mean_and_ci_over_episodes(heldout):
    r = evaluate_dataset(make_learner(), "synth_4", heldout, 4, eval_cfg(shots=2, episodes=4), CPU, seed=0)
    a = r["adapted"]
    assert a["shots"] == 2 and a["episodes"] == 4 and set(k for k in a if k.isdigit()) == {"2"}
    assert a["adapt_steps"] == 2 and a["adapt_lr"] == 0.5  # the learner's K and alpha by default
    eps = a["per_episode"]
    for key in ("miou", "mf1", "pixel_acc"):
        assert a[key] == mean_ci95([ep[key] for ep in eps])
        assert a["image"][key] == mean_ci95([ep[f"image_{key}"] for ep in eps])
    assert a["iou"]["mean"][1] == pytest.approx(np.nanmean([ep_iou for ep_iou in _episode_class(r, 1)]))
    assert len(a["iou"]["ci95"]) == 4
    z = r["zero_shot"]
    assert z["image"]["miou"] != z["miou"]  # the two reductions are different numbers here
    assert r["scored"] == 12 and "adapted" in r


def _episode_class(r, c):
    """Class c's IoU in each episode of ``r``, recomputed independently: adapt theta on the support, score the rest."""
    learner = make_learner()  # the same theta (seeded)
    ds = synthetic_heldout(12)
    values = []
    for ep in r["adapted"]["per_episode"]:
        adapted = learner.adapt(*collate(ds, ep["support"]))
        rest = sorted(set(range(12)) - set(ep["support"]))
        values.append(score(adapted, ds, rest, 4, CPU, 4, learner.precision)["iou"][c])
    return values


def test_adaptation_overrides_and_no_adaptation(heldout):
    learner = make_learner()
    r = evaluate_dataset(learner, "synth_4", heldout, 4, eval_cfg(shots=1, episodes=2, adapt_steps=0), CPU, seed=0)
    # zero adaptation steps: the "adapted" model is theta, scored on each episode's query
    for ep in r["adapted"]["per_episode"]:
        rest = sorted(set(range(12)) - set(ep["support"]))
        assert ep["miou"] == score(learner.model, heldout, rest, 4, CPU, 4, learner.precision)["miou"]
    assert "adapted" not in evaluate_dataset(learner, "synth_4", heldout, 4, eval_cfg(shots=0), CPU, seed=0)
    assert "adapted" not in evaluate_dataset(learner, "synth_4", heldout, 4, eval_cfg(episodes=0), CPU, seed=0)
    with pytest.raises(ConfigError, match="eval.shots=12 leaves none"):
        evaluate_dataset(learner, "synth_4", heldout, 4, eval_cfg(shots=[1, 12]), CPU, seed=0)


def test_capped_query_is_drawn_from_each_episode(heldout):
    """eval.max_images: each episode scores its own next images after the support, not the lowest numbers."""
    learner = make_learner()
    r = evaluate_dataset(learner, "synth_4", heldout, 4, eval_cfg(shots=[2], episodes=4, max_images=3, adapt_steps=0),
                         CPU, seed=0)
    eps = r["adapted"]["2"]["per_episode"]
    queries = []
    for e, ep in enumerate(eps):
        order = np.random.default_rng([0, __import__("zlib").crc32(b"synth_4"), e]).permutation(12)
        assert ep["support"] == order[:2].tolist()
        query = sorted(order[2:5].tolist())  # the next three of the permutation
        assert ep["miou"] == score(learner.model, heldout, query, 4, CPU, 4, learner.precision)["miou"]
        queries.append(tuple(query))
    assert len(set(queries)) == 4  # episodes score different images
    assert r["adapted"]["2"]["scored"] == 3 and r["scored"] == 3


@pytest.mark.parametrize("override,message", [
    ({"shots": "five"}, "eval.shots='five'"),
    ({"shots": [1, 0]}, "eval.shots=[1, 0] must list integers >= 1"),
    ({"shots": [5, 5]}, "names a k twice"),
    ({"shots": -1}, "eval.shots=-1"),
    ({"episodes": -1}, "eval.episodes=-1"),
    ({"batch_size": 0}, "eval.batch_size=0"),
    ({"mode": "tile"}, "eval.mode='tile' is not one of resize, slide"),
    ({"window": 4}, "eval.window=4"),
    ({"stride": 0}, "eval.stride=0"),
    ({"adapt_lr": 0.0}, "eval.adapt_lr=0.0"),
    ({"max_images": 0}, "eval.max_images=0"),
])
def test_bad_eval_config_names_the_key(override, message):
    with pytest.raises(ConfigError) as exc:
        validate_eval(eval_cfg(**override))
    assert message in str(exc.value)


def test_shots_from_the_command_line():
    assert validate_eval(compose_cfg("eval", ["checkpoint=x", "eval.shots=5"]).eval).shots == (5,)
    assert validate_eval(compose_cfg("eval", ["checkpoint=x", "eval.shots=[1,5,10]"]).eval).shots == (1, 5, 10)
    assert validate_eval(compose_cfg("train", ["eval.shots=[2,4]"]).eval).shots == (2, 4)
    assert validate_eval(compose_cfg("train", ["eval.shots=0"]).eval).shots == ()


CALLS = []  # module-level: adaptation runs on deep copies of the model


class Recorder(nn.Module):
    """TinyNet that records, per forward pass, the batch size and whether a graph could be built."""

    def __init__(self):
        super().__init__()
        self.net = TinyNet()

    def forward(self, x):
        CALLS.append((x.shape[0], torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return self.net(x)


def test_scoring_is_batched_under_inference_mode(heldout):
    model = Recorder()
    CALLS.clear()
    score(model, heldout, list(range(10)), 4, CPU, 4, None)
    assert CALLS == [(4, True, False), (4, True, False), (2, True, False)]
    learner = MAML(model, inner_lr=0.1, inner_steps=1)
    CALLS.clear()
    evaluate_dataset(learner, "synth_4", heldout, 4, eval_cfg(shots=2, episodes=1), CPU, seed=0)
    # zero-shot: 12 images in 3 batches; adaptation: one graph-building step on the 2 shots; query: 10 in 3
    assert [c for c in CALLS if not c[1]] == [(2, False, True)]
    assert [c[0] for c in CALLS if c[1]] == [4, 4, 4, 4, 4, 2]


# -- sliding window -----------------------------------------------------------------------
@torch.inference_mode()
def slide_one(model, image, window, stride, batch_size):
    """The averaged sliding-window logits (K, H, W) :func:`slide` gives one image (C, H, W)."""
    [(_, logits, _)] = slide(model, iter([(0, image, torch.zeros(image.shape[-2:]))]), window, stride, batch_size,
                             None)
    return logits


def test_window_starts_cover_the_image_and_end_at_the_border():
    assert window_starts(45, 16, 8) == [0, 8, 16, 24, 29]
    assert window_starts(37, 16, 8) == [0, 8, 16, 21]
    assert window_starts(16, 16, 8) == [0] and window_starts(10, 16, 8) == [0]
    assert window_starts(40, 16, 16) == [0, 16, 24]


@pytest.mark.parametrize("size", [(45, 37), (10, 12), (16, 16), (16, 40)])
def test_slide_equals_a_full_forward_for_a_pointwise_model(size):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 1)  # each pixel's logits depend on that pixel only
    image = torch.randn(3, *size)
    got = slide_one(conv, image, (16, 16), (8, 8), batch_size=3)
    with torch.no_grad():
        want = conv(image[None])[0]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)


class WindowMean(nn.Module):
    """Logits that depend on the whole window: (mean of channel 0, minus it), broadcast."""

    def forward(self, x):
        m = x[:, :1].mean((2, 3), keepdim=True).expand(-1, 1, *x.shape[2:])
        return torch.cat([m, -m], 1)


def test_slide_averages_overlapping_windows():
    torch.manual_seed(1)
    image = torch.randn(3, 45, 37)
    got = slide_one(WindowMean(), image, (16, 16), (8, 8), batch_size=4)
    total, count = np.zeros((45, 37)), np.zeros((45, 37))
    x0 = image[0].numpy()
    for y in (0, 8, 16, 24, 29):
        for x in (0, 8, 16, 21):
            total[y : y + 16, x : x + 16] += x0[y : y + 16, x : x + 16].mean()
            count[y : y + 16, x : x + 16] += 1
    np.testing.assert_allclose(got[0].numpy(), total / count, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1].numpy(), -total / count, rtol=1e-5, atol=1e-6)


def threshold_model():
    conv = nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[1, 0] = 1.0  # logit of class 1 = channel 0, of class 0 = 0
    return conv


def test_slide_mode_scores_the_original_resolution():
    ds, model = FullRes(), threshold_model()
    capture = dict.fromkeys(range(4))
    s = score(model, ds, range(4), 2, CPU, 5, None, mode="slide", window=(16, 16), stride=(8, 8), capture=capture)
    assert s["miou"] == 1.0 and s["image"]["miou"] == 1.0
    assert [tuple(capture[i].shape) for i in range(4)] == FullRes.sizes  # predicted at the original size
    capture = dict.fromkeys(range(4))
    score(model, ds, range(4), 2, CPU, 5, None, mode="resize", capture=capture)
    assert all(tuple(capture[i].shape) == (16, 16) for i in range(4))


def test_slide_batches_windows_across_images():
    torch.manual_seed(0)
    model, ds = nn.Conv2d(3, 3, 3, padding=1), FullRes()  # no BatchNorm: batching must not matter
    got = {}
    with torch.inference_mode():
        for chunk, pred, mask in predictions(model, ds, range(4), CPU, 5, mode="slide", window=(16, 16),
                                             stride=(8, 8)):
            got[chunk[0]] = pred[0]
            assert pred.shape == mask.shape
    for i in range(4):
        image, _ = ds.full_resolution(i)
        assert torch.equal(got[i], slide_one(model, image, (16, 16), (8, 8), batch_size=1).argmax(0))


def test_slide_without_full_resolution_equals_resize(heldout):
    learner = make_learner()
    resize = evaluate_dataset(learner, "synth_4", heldout, 4, eval_cfg(shots=1, episodes=2), CPU, seed=0)
    slide = evaluate_dataset(learner, "synth_4", heldout, 4, eval_cfg(shots=1, episodes=2, mode="slide"), CPU,
                             seed=0)
    assert slide["window"] == [32, 32] and slide["stride"] == [16, 16]  # the training size, half of it
    assert slide["zero_shot"]["miou"] == pytest.approx(resize["zero_shot"]["miou"], abs=1e-12)
    assert slide["adapted"]["miou"]["mean"] == pytest.approx(resize["adapted"]["miou"]["mean"], abs=1e-12)
