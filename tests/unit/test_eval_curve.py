"""The adaptation curve (eval.curve_steps): one adaptation per (k, episode), scored on the way, equal to separate runs."""

import copy
import dataclasses
import json

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from metaseg.config import EvalConfig
from metaseg.engine.evaluation import protocol
from metaseg.engine.evaluation.checkpoint_eval import evaluate_checkpoint
from metaseg.engine.evaluation.protocol import evaluate_dataset, evaluate_heldout, score
from metaseg.engine.evaluation.settings import validate_eval
from metaseg.engine.evaluation.validation import evaluate_validation
from metaseg.engine.heads import NewHeadLearner, head_conv
from metaseg.meta import MAML
from metaseg.meta.metasgd import MetaSGD
from metaseg.meta.precision import Precision
from metaseg.metrics import mean_ci95
from metaseg.models.factory import build_model
from metaseg.utils.errors import ConfigError
from tests.helpers import FullRes, TinyNet, as_json, compose_cfg, eval_cfg, make_learner

CPU = torch.device("cpu")
SMALL_MODEL = ["model.extra.decoder_channels=[16,8,8]"]
SMALL_DATA = ["data=synthetic", "data.size=16", "data.datasets.synth_4.num_images=6",
              "data.datasets.synth_5.num_images=6"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions gain nothing from threads, and on a shared two-core machine two torch
    threads contending with a training job made this file five times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mean_and_ci(values) -> dict:
    m = mean_ci95(values)
    return {"mean": m["mean"], "ci95": m["ci95"]}


# -- snapshots along one adaptation are the separate adaptations ----------------------------
def _learners():
    """Plain SGD on both backends, learned per-step rates (asked for more steps than trained),
    an adapted subset (its frozen modules memoised per chunk), and a new prototype head."""
    torch.manual_seed(0)
    yield "maml-higher", MAML(TinyNet(), inner_lr=0.5, inner_steps=2), 0.5
    torch.manual_seed(0)
    yield "maml-func", MAML(TinyNet(), inner_lr=0.5, inner_steps=2, backend="func"), 0.5
    torch.manual_seed(0)
    sgd = MetaSGD(TinyNet(), inner_lr=0.5, inner_steps=2, per_element=True, per_step=True)
    with torch.no_grad():
        for table in sgd.step_sizes.values:  # distinct rates per step: a wrong step index changes the weights
            table.uniform_(0.1, 0.6)
    yield "metasgd-per-step", sgd, None
    torch.manual_seed(0)
    yield "subset", MAML(TinyNet(), inner_lr=0.5, inner_steps=2, inner_params=["body.2"]), 0.5
    torch.manual_seed(0)
    model = build_model(compose_cfg("train", ["experiment=smoke", *SMALL_MODEL]).model, 2)
    with torch.no_grad():  # a new head starts at zero (heads.load_body)
        head_conv(model).weight.zero_()
        head_conv(model).bias.zero_()
    yield "new-head", NewHeadLearner(MAML(model, inner_lr=0.05, inner_steps=1)), 0.05


@pytest.mark.parametrize("name,learner,lr", list(_learners()), ids=lambda v: v if isinstance(v, str) else "")
def test_each_snapshot_is_the_separate_adaptation(name, learner, lr):
    torch.manual_seed(1)
    smp = name == "new-head"  # the slow one: fewer, smaller steps
    size, steps, at = (16, 2, [1, 0]) if smp else (32, 4, [3, 0, 1])
    images = torch.randn(2, 3, size, size)
    masks = torch.randint(0, 2 if smp else 4, (2, size, size))
    theta = copy.deepcopy(learner.model.state_dict())
    seen = {}
    final = learner.adapt(images, masks, steps=steps, lr=lr, at=at,
                          visit=lambda t, model: seen.setdefault(t, copy.deepcopy(model.state_dict())))
    assert list(seen) == sorted(at)  # each count once, in increasing order
    for t, got in [*seen.items(), (steps, final.state_dict())]:
        want = learner.adapt(images, masks, steps=t, lr=lr).state_dict()
        for key in want:
            assert torch.equal(got[key], want[key]), (t, key)
    assert all(torch.equal(v, theta[k]) for k, v in learner.model.state_dict().items())  # theta untouched
    if smp:  # the snapshot at 0 steps already has the prototype head, like adapt_steps=0
        assert head_conv(learner.model).weight.abs().sum() == 0 and seen[0]["segmentation_head.0.weight"].abs().sum() > 0
    with pytest.raises(ValueError, match="0..steps=2"):
        learner.adapt(images, masks, steps=2, lr=lr, at=[0, 3], visit=lambda t, m: None)


def test_fp16_restarts_keep_each_snapshot_equal_to_its_own_adaptation():
    """A scale far too large overflows the first steps: adaptation restarts at half the scale until
    they are finite; a snapshot counts only once no restart can follow it, as in its own run."""
    torch.manual_seed(0)
    precision = Precision("16", "cpu", init_scale=2.0**26)
    learner = MAML(TinyNet(), inner_lr=0.5, inner_steps=2, precision=precision)
    images, masks = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
    seen = {}
    learner.adapt(images, masks, steps=3, at=[0, 1, 3],
                  visit=lambda t, model: seen.setdefault(t, copy.deepcopy(model.state_dict())))
    assert precision.scale < 2.0**26  # it did restart
    for t, got in seen.items():
        precision.scale = 2.0**26
        want = learner.adapt(images, masks, steps=t).state_dict()
        assert all(torch.equal(got[key], want[key]) for key in want), t


# -- the curve in evaluate_dataset ------------------------------------------------------------
def test_curve_equals_the_protocol_at_each_step_count_and_zero_shot_at_zero(heldout):
    learner = make_learner()  # K = 2
    with_curve = evaluate_dataset(learner, "synth_4", heldout, 4, eval_cfg(episodes=3, curve_steps=[3, 0, 1]),
                                  CPU, seed=0)
    curve = with_curve["curve"]
    assert curve["metric"] == "miou" and list(curve["shots"]) == ["1", "2"]
    assert all(list(by_steps) == ["0", "1", "3"] for by_steps in curve["shots"].values())
    for steps in (1, 3):  # (a) the separate protocol run with eval.adapt_steps=S, on the same episodes
        alone = evaluate_dataset(learner, "synth_4", heldout, 4, eval_cfg(episodes=3, adapt_steps=steps), CPU, seed=0)
        for k in ("1", "2"):
            want = alone["adapted"][k]["miou"]
            episodes = [ep["miou"] for ep in alone["adapted"][k]["per_episode"]]
            assert curve["shots"][k][str(steps)] == {"mean": want["mean"], "ci95": want["ci95"], "per_episode": episodes}
    # (b) S=0 is theta scored on each episode's query images (not the zero-shot images: all 12 here)
    queries = [sorted(set(range(12)) - set(ep["support"])) for ep in with_curve["adapted"]["2"]["per_episode"]]
    unadapted = [score(learner.model, heldout, q, 4, CPU, 4, learner.precision)["miou"] for q in queries]
    zero = {**mean_and_ci(unadapted), "per_episode": unadapted}
    assert curve["shots"]["1"]["0"] == curve["shots"]["2"]["0"] == zero  # episode by episode
    assert zero["mean"] != with_curve["zero_shot"]["miou"]  # a different image set, so a different number
    # the protocol's table (K=2 steps, not on the curve) is what a run without a curve gives
    plain = evaluate_dataset(learner, "synth_4", heldout, 4, eval_cfg(episodes=3), CPU, seed=0)
    assert as_json(with_curve["adapted"]) == as_json(plain["adapted"]) and "curve" not in plain
    assert curve["shots"]["2"]["3"]["mean"] != zero["mean"]  # adaptation moves the score


def test_curve_shots_follows_the_named_k_only_and_leaves_the_table_unchanged(heldout):
    learner = make_learner()
    both = evaluate_dataset(learner, "synth_4", heldout, 4, eval_cfg(episodes=2, curve_steps=[0, 3]), CPU, seed=0)
    one = evaluate_dataset(learner, "synth_4", heldout, 4, eval_cfg(episodes=2, curve_steps=[0, 3], curve_shots=[2]),
                           CPU, seed=0)
    assert list(one["curve"]["shots"]) == ["2"] and one["curve"]["shots"]["2"] == both["curve"]["shots"]["2"]
    assert as_json(one["adapted"]) == as_json(both["adapted"])
    with pytest.raises(ConfigError, match=r"eval.curve_shots=\[5\] names k=\[5\] that eval.shots=\[1, 2\]"):
        validate_eval(eval_cfg(curve_steps=[0, 3], curve_shots=[5]))


def test_curve_split_over_two_ranks_is_the_one_process_curve(heldout, monkeypatch):
    """Under torchrun each rank adapts every second episode; the curve's points travel with their
    episode's record through the same gather, so rank 0 reports exactly one process's numbers.
    Two ranks are played here in turn: rank 1's gathered items are handed to rank 0's gather."""
    cfg = eval_cfg(episodes=3, curve_steps=[0, 2])
    one = evaluate_dataset(make_learner(), "synth_4", heldout, 4, cfg, CPU, seed=0)
    sent = []
    monkeypatch.setattr(protocol, "episode_share", lambda n: list(range(1, n, 2)))
    monkeypatch.setattr(protocol, "gather", lambda items: sent.append(list(items)) or list(items))
    evaluate_dataset(make_learner(), "synth_4", heldout, 4, cfg, CPU, seed=0)  # rank 1: episode 1
    from_rank1 = iter(sent)  # one gather per k, in the same order on every rank
    monkeypatch.setattr(protocol, "episode_share", lambda n: list(range(0, n, 2)))
    monkeypatch.setattr(protocol, "gather", lambda items: list(items) + next(from_rank1))
    two = evaluate_dataset(make_learner(), "synth_4", heldout, 4, cfg, CPU, seed=0)  # rank 0: episodes 0, 2
    assert as_json(two["curve"]) == as_json(one["curve"]) and as_json(two) == as_json(one)


def test_binary_curve_reports_foreground_dice():
    torch.manual_seed(0)
    learner = MAML(TinyNet(classes=2), inner_lr=0.5, inner_steps=2)
    cfg = OmegaConf.structured(EvalConfig(shots=[1], episodes=2, batch_size=4, pictures=0, curve_steps=[0, 2]))
    result = evaluate_heldout(learner, {"vessels": FullRes()}, 2, cfg, CPU, 0, ["background", "vessel"])
    res = result["datasets"]["vessels"]
    assert res["curve"]["metric"] == "fg_dice"
    want = res["adapted"]["1"]["fg_dice"]  # eval.adapt_steps = K = 2 is on the curve
    episodes = [ep["fg_dice"] for ep in res["adapted"]["1"]["per_episode"]]
    assert res["curve"]["shots"]["1"]["2"] == {"mean": want["mean"], "ci95": want["ci95"], "per_episode": episodes}
    assert result["protocol"]["curve_steps"] == [0, 2]


def test_validation_tasks_draw_no_curve(heldout):
    val = evaluate_validation(make_learner(), {"v": heldout}, 4, eval_cfg(shots=[1], episodes=1, curve_steps=[0, 1]),
                              CPU, 0)
    assert "curve" not in val["datasets"]["v"] and "curve_steps" not in val["protocol"]


# -- what metaseg-eval writes ---------------------------------------------------------------------
def test_eval_json_md_and_png(tmp_path):
    overrides = ["checkpoint=none", *SMALL_DATA, *SMALL_MODEL, "device=cpu", "eval.shots=[1,2]", "eval.episodes=2",
                 "eval.pictures=0", "eval.batch_size=8", "eval.curve_steps=[0,2,1]", "meta.inner_steps=1",
                 "meta.inner_lr=0.05"]
    evaluate_checkpoint(compose_cfg("eval", overrides), tmp_path)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["protocol"]["curve_steps"] == [0, 1, 2]
    for name in ("synth_4", "synth_5"):
        res = result["datasets"][name]
        curve = res["curve"]
        assert set(curve) == {"metric", "shots"} and curve["metric"] == "miou"
        assert list(curve["shots"]) == ["1", "2"]
        for k, by_steps in curve["shots"].items():
            assert list(by_steps) == ["0", "1", "2"]
            for cell in by_steps.values():
                assert set(cell) == {"mean", "ci95", "per_episode"} and 0 <= cell["mean"] <= 1 and cell["ci95"] >= 0
            want = res["adapted"][k]["miou"]  # eval.adapt_steps = meta.inner_steps = 1
            episodes = [ep["miou"] for ep in res["adapted"][k]["per_episode"]]  # paired with the table's episodes
            assert by_steps["1"] == {"mean": want["mean"], "ci95": want["ci95"], "per_episode": episodes}
    md = (tmp_path / "eval.md").read_text()
    assert "## Adaptation curve (%), dataset reduction" in md and "### synth_5: mIoU" in md
    assert md.count("| k | 0 steps | 1 step | 2 steps |") == 2
    cell = result["datasets"]["synth_4"]["curve"]["shots"]["2"]["2"]
    row = md.split("### synth_4: mIoU")[1].split("| 2-shot |")[1].splitlines()[0]
    assert row.rstrip().endswith(f"{100 * cell['mean']:.1f} ± {100 * cell['ci95']:.1f} |")
    png = tmp_path / "curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as img:
        img.verify()
    with Image.open(png) as img:
        assert img.width > img.height  # two panels side by side
        assert len(img.convert("RGB").getcolors(1 << 16) or []) > 10  # drawn, not blank


def test_the_key_reaches_both_commands():
    assert list(compose_cfg("eval", ["checkpoint=x", "eval.curve_steps=[0,1,3,10,30,100]"]).eval.curve_steps) == \
        [0, 1, 3, 10, 30, 100]
    train = compose_cfg("train", ["eval.curve_steps=[0,3]"]).eval
    assert list(train.curve_steps) == [0, 3] and list(compose_cfg("train").eval.curve_steps) == []
    validate_eval(train)


# -- bad values: one line naming the key and the fix ------------------------------------------
def _plain_cfg(**kw):
    return OmegaConf.create({**dataclasses.asdict(EvalConfig(shots=[1, 5])), **kw})


@pytest.mark.parametrize("cfg,message", [
    (lambda: eval_cfg(curve_steps=[0, -1]), "eval.curve_steps=[0, -1] must list integers >= 0, e.g. eval.curve_steps="),
    (lambda: eval_cfg(curve_steps=[3, 3]), "eval.curve_steps=[3, 3] names a step count twice; list each once"),
    (lambda: _plain_cfg(curve_steps=5), "eval.curve_steps=5 must be a list of step counts >= 0"),
    (lambda: _plain_cfg(curve_steps=[1, "x"]), "eval.curve_steps=[1, 'x'] must list integers >= 0"),
    (lambda: eval_cfg(shots=0, curve_steps=[0, 1]), "eval.curve_steps=[0, 1] needs few-shot episodes, but eval.shots=0"),
    (lambda: eval_cfg(episodes=0, curve_steps=[1]), "set eval.shots=[1,5,10] and eval.episodes>=1, or eval.curve_steps=[]"),
])
def test_bad_curve_steps_name_the_key_and_the_fix(cfg, message):
    with pytest.raises(ConfigError) as exc:
        validate_eval(cfg())
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_metaseg_eval_stops_before_writing_anything(tmp_path):
    cfg = compose_cfg("eval", ["checkpoint=none", *SMALL_DATA, "device=cpu", "eval.curve_steps=[1,1]"])
    with pytest.raises(ConfigError, match=r"^eval.curve_steps=\[1, 1\] names a step count twice; list each once$"):
        evaluate_checkpoint(cfg, tmp_path)
    assert not (tmp_path / "eval.json").exists()
