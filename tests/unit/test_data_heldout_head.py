"""A held-out label space of its own: data=folder on a synthetic checkpoint gets a new, prototype-initialised head."""

import copy
import json

import pytest
import torch

from metaseg.engine.evaluation.checkpoint_eval import evaluate_checkpoint
from metaseg.engine.heads import NewHeadLearner, head_conv, load_body, prototype_head
from metaseg.engine.load import heldout_data
from metaseg.models.factory import build_model
from tests.helpers import SMALL_DECODER, compose_cfg, folder_dataset, seeded_checkpoint

SMALL = [SMALL_DECODER]


def small_model(classes: int):
    return build_model(compose_cfg("train", ["experiment=smoke", *SMALL]).model, classes)


def test_load_body_keeps_every_weight_but_the_head():
    old, new = small_model(4), small_model(2)
    load_body(new, old.state_dict(), "ckpt.pt")
    for k, v in new.state_dict().items():
        if k.startswith("segmentation_head."):
            assert v.abs().sum() == 0 and v.shape[0] == 2
        else:
            assert torch.equal(v, old.state_dict()[k]), k


def test_prototype_head_is_the_nearest_prototype_classifier():
    torch.manual_seed(0)
    model = small_model(3)
    images = torch.randn(4, 3, 32, 32)
    masks = torch.randint(0, 3, (4, 32, 32))
    masks[:, :2] = 255  # ignored pixels take no part in the prototypes
    protos = prototype_head(model, images, masks)
    feats = []
    hook = head_conv(model).register_forward_hook(lambda m, i, o: feats.append(i[0]))
    model.train()
    with torch.no_grad():
        logits = model(images)
    hook.remove()
    f = feats[0].permute(0, 2, 3, 1).reshape(-1, feats[0].shape[1])
    # independent check: prototypes are class means of the support features, and the head ranks
    # classes by squared distance to them
    m = masks.reshape(-1)
    for c in range(3):
        assert torch.allclose(protos[c], f[m == c].mean(0), atol=1e-4)
    nearest = torch.cdist(f, protos).argmin(1)
    pred = logits.permute(0, 2, 3, 1).reshape(-1, 3).argmax(1)
    assert (pred == nearest).float().mean() > 0.999


def test_new_head_learner_adapts_from_prototypes_and_leaves_the_model_alone():
    torch.manual_seed(1)
    learner_model = small_model(2)
    from metaseg.meta import MAML
    learner = NewHeadLearner(MAML(learner_model, inner_lr=0.05, inner_steps=1))
    before = {k: v.clone() for k, v in learner_model.state_dict().items()}
    images, masks = torch.randn(2, 3, 32, 32), torch.randint(0, 2, (2, 32, 32))
    adapted = learner.adapt(images, masks)
    assert learner.model is learner_model and learner.inner_steps == 1
    assert all(torch.equal(v, before[k]) for k, v in learner_model.state_dict().items())
    assert head_conv(adapted).weight.abs().sum() > 0  # started from prototypes, then adapted
    # with no inner step the adapted model is exactly the prototype head on the checkpoint's body
    zero = learner.adapt(images, masks, steps=0)
    reference = copy.deepcopy(learner_model)
    prototype_head(reference, images, masks)
    assert all(torch.allclose(a, b) for a, b in zip(zero.state_dict().values(), reference.state_dict().values()))
    assert not torch.equal(head_conv(zero).weight, head_conv(adapted).weight)


@pytest.fixture(scope="module")
def synthetic_checkpoint(tmp_path_factory):
    """A synthetic (4-class) smoke-sized checkpoint; seeded weights: evaluation needs no training."""
    cfg = compose_cfg("train", ["experiment=smoke", "trainer.device=cpu", *SMALL])
    return seeded_checkpoint(tmp_path_factory.mktemp("synth") / "last.pt", cfg, seed=0, step=1)


def test_eval_folder_with_a_label_space_of_its_own(tmp_path, synthetic_checkpoint):
    data = folder_dataset(tmp_path / "data", n=6, h=24, w=24)
    cfg = compose_cfg("eval", [f"checkpoint={synthetic_checkpoint}", "data=folder", f"data.root={data}",
                               "device=cpu", "eval.shots=2", "eval.episodes=2", "data.workers=1"])
    result = evaluate_checkpoint(cfg, tmp_path / "E")
    saved = json.loads((tmp_path / "E" / "eval.json").read_text())
    assert saved["head"]["kind"] == "new" and saved["head"]["checkpoint_classes"] == [
        "background", "disk", "square", "triangle"]
    assert saved["classes"] == ["background", "foreground"]
    res = result["datasets"]["folder"]
    assert res["images"] == 6 and res["adapted"]["shots"] == 2 and len(res["adapted"]["per_episode"]) == 2
    assert len(res["zero_shot"]["iou"]) == 2  # scored in the folder's two classes
    # the zero head predicts class 0 everywhere: background IoU = its pixel share, foreground 0
    assert res["zero_shot"]["iou"][1] == 0 and res["zero_shot"]["iou"][0] == pytest.approx(0.5)
    # data=folder leaves data.size 0: the checkpoint's size (smoke: 32) and mean/std are used
    trained = compose_cfg("train", ["experiment=smoke"]).data
    used = heldout_data(cfg.data, trained)
    assert saved["config"]["data"]["size"] == 0 and used.size == 32
    assert list(used.mean) == [0.5, 0.5, 0.5] and list(cfg.data.mean) == [0.485, 0.456, 0.406]
    again = evaluate_checkpoint(cfg, tmp_path / "E2")
    assert again["datasets"] == result["datasets"]  # seeded, CPU: the same numbers
