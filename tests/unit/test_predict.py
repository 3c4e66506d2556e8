"""metaseg-predict's engine on tiny folders: that it writes the adapted model's prediction, and its errors.

A synthetic (4-class, 32 px) checkpoint (seeded weights: prediction needs no training) adapts to
small binary folders written into ``tmp_path``. The command itself is tests/integration/test_predict.py;
the vessel check on real data tests/integration/test_predict_retina.py.
"""


import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from PIL import Image

from metaseg.data.labels import build_label_map
from metaseg.engine.load import checkpoint_model, read_checkpoint
from metaseg.engine.prediction.export import batch_statistics
from metaseg.engine.prediction.files import LEGEND_MIN_WIDTH, overlay, overlay_colours, support_values
from metaseg.engine.prediction.segment import segment_folder
from metaseg.utils.errors import ConfigError, DataError
from tests.helpers import SMALL_DECODER, compose_cfg, folder_dataset, image_folder, rgb, seeded_checkpoint

SMALL = [SMALL_DECODER]
SIZES = {"a": (20, 16), "b": (47, 33), "c": (32, 32)}  # stem -> (W, H), as helpers.image_folder writes them


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A synthetic smoke-sized checkpoint, seeded weights, at checkpoints/last.pt."""
    cfg = compose_cfg("train", ["experiment=smoke", "trainer.device=cpu", *SMALL])
    return seeded_checkpoint(tmp_path_factory.mktemp("synth") / "checkpoints" / "last.pt", cfg, seed=0, step=1)


def predict(*overrides):
    cfg = compose_cfg("predict", ["device=cpu", "workers=2", *overrides])
    return segment_folder(cfg)


def read_mask(path):
    return np.array(Image.open(path))


@pytest.fixture(scope="module")
def adapted_run(tmp_path_factory, checkpoint):
    root = tmp_path_factory.mktemp("adapted")
    support = folder_dataset(root / "support", n=4, h=24, w=24)
    images = image_folder(root / "images", bad=False)
    result = predict(f"checkpoint={checkpoint}", f"support={support}", f"images={images}", f"out={root / 'out'}",
                     "save_adapted=true", "batch_size=1", "adapt.steps=2", "adapt.lr=0.05")
    return root, result


def test_masks_are_the_adapted_models_upsampled_argmax(adapted_run):
    root, result = adapted_run
    assert result["support"]["steps"] == 2 and result["support"]["lr"] == 0.05
    ckpt, train_cfg = read_checkpoint(root / "out" / "adapted.pt")
    assert ckpt["classes"] == ["background", "foreground"] and ckpt["adapted"]["images"] == 4
    model, head = checkpoint_model(ckpt, train_cfg, ckpt["classes"], "adapted.pt")
    assert head["kind"] == "checkpoint"  # the adapted model predicts the support's classes itself
    model.eval()
    mean = torch.tensor(train_cfg.data.mean).view(3, 1, 1)
    std = torch.tensor(train_cfg.data.std).view(3, 1, 1)
    size = train_cfg.data.size
    for stem, (w, h) in SIZES.items():
        path = next((root / "images").glob(f"{stem}.*"))
        image = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
        x = (torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 - mean) / std
        with torch.no_grad():
            logits = model(x[None])
        expected = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)[0].argmax(0).numpy()
        assert np.array_equal(read_mask(root / "out" / "masks" / f"{stem}.png"), expected), stem


def test_saved_checkpoint_predicts_what_the_adapting_run_wrote(adapted_run):
    root, _ = adapted_run
    result = predict(f"checkpoint={root / 'out' / 'adapted.pt'}", f"images={root / 'images'}",
                     f"out={root / 'again'}", "batch_size=1")
    assert result["support"] is None and result["head"]["kind"] == "checkpoint"
    for stem in SIZES:
        assert np.array_equal(read_mask(root / "again" / "masks" / f"{stem}.png"),
                              read_mask(root / "out" / "masks" / f"{stem}.png"))
    assert torch.load(root / "out" / "adapted.pt", weights_only=True)["adapted"]["from"].endswith("last.pt")


def test_smp_folder_loads_without_metaseg_and_gives_the_same_predictions(adapted_run):
    root, result = adapted_run
    assert result["adapted_model"] == {"checkpoint": "adapted.pt", "smp": "adapted_smp"}
    ckpt, train_cfg = read_checkpoint(root / "out" / "adapted.pt")
    ours, _ = checkpoint_model(ckpt, train_cfg, ckpt["classes"], "adapted.pt")
    plain = smp.from_pretrained(str(root / "out" / "adapted_smp"))
    assert type(plain) is smp.Unet and plain.segmentation_head[0].out_channels == 2
    bn = plain.encoder.bn1
    assert bn.running_mean is not None and not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ours.eval()
    with torch.no_grad():
        expected = ours(x)
        plain.eval()
        running = plain(x)  # smp's own eval mode: the running statistics estimated on the support
        exact = batch_statistics(plain)(x)  # metaseg's convention: the batch's own statistics
    assert torch.allclose(exact, expected, atol=1e-5)
    assert not torch.allclose(running, expected, atol=1e-3)


def test_slide_equals_resize_at_the_training_size_and_keeps_larger_images_whole(tmp_path, checkpoint):
    images = image_folder(tmp_path / "images", {"p": (32, 32), "q": (32, 32), "r": (32, 32)}, bad=False)
    resize = predict(f"checkpoint={checkpoint}", f"images={images}", f"out={tmp_path / 'R'}", "batch_size=2")
    slide = predict(f"checkpoint={checkpoint}", f"images={images}", f"out={tmp_path / 'S'}", "batch_size=2",
                    "mode=slide")
    assert resize["classes"] == ["background", "disk", "square", "triangle"]  # zero-shot: the checkpoint's
    assert slide["window"] == [32, 32] and slide["stride"] == [16, 16]
    for stem in "pqr":
        a, b = read_mask(tmp_path / "R" / "masks" / f"{stem}.png"), read_mask(tmp_path / "S" / "masks" / f"{stem}.png")
        assert a.shape == (32, 32) and np.array_equal(a, b)
    large = image_folder(tmp_path / "large", {"big": (70, 45)}, bad=False)
    predict(f"checkpoint={checkpoint}", f"images={large}", f"out={tmp_path / 'L'}", "mode=slide", "stride=8")
    assert read_mask(tmp_path / "L" / "masks" / "big.png").shape == (45, 70)


def test_images_are_segmented_at_the_size_the_support_was_read_at(tmp_path, checkpoint):
    support = folder_dataset(tmp_path / "support", n=2, h=24, w=24)
    images = image_folder(tmp_path / "images", bad=False)
    common = [f"checkpoint={checkpoint}", f"support={support}", f"images={images}", "adapt.steps=0"]
    assert predict(*common, f"out={tmp_path / 'a'}")["size"] == 32  # data=folder: the checkpoint's size
    result = predict(*common, f"out={tmp_path / 'b'}", "data.size=24", "mode=slide")
    assert result["size"] == 24 and result["window"] == [24, 24] and result["support"]["steps"] == 0


def test_random_init_on_a_three_class_support_writes_the_supports_own_values(tmp_path):
    raw = np.zeros((24, 24), np.uint8)
    raw[:, 8:16], raw[:, 16:] = 128, 255
    support = folder_dataset(tmp_path / "support", n=3, h=24, w=24, masks=[raw] * 3)
    images = image_folder(tmp_path / "images", bad=False)
    result = predict("checkpoint=none", f"support={support}", f"images={images}", f"out={tmp_path / 'out'}",
                     "data.size=32", "data.num_classes=3", "data.datasets.folder.mask_values={0:0,128:1,255:2}",
                     "masks=support", "adapt.steps=2", *SMALL)
    assert result["classes"] == ["background", "class_1", "class_2"] and result["head"]["kind"] == "random"
    for stem, (w, h) in SIZES.items():
        mask = Image.open(tmp_path / "out" / "masks" / f"{stem}.png")
        assert mask.mode == "L" and mask.size == (w, h)
        assert set(np.unique(np.array(mask))) <= {0, 128, 255}


def test_support_values_invert_the_label_map():
    cfg = compose_cfg("predict", ["checkpoint=x", "images=x", "out=x"]).data.datasets.folder
    binary = build_label_map("folder", cfg, ["background", "foreground"])
    assert support_values(binary, ["background", "foreground"]).tolist() == [0, 255]
    cfg.mask_values = {0: 0, 7: 1, 9: 1}
    mapped = build_label_map("folder", cfg, ["background", "foreground"])
    assert support_values(mapped, ["background", "foreground"]).tolist() == [0, 7]
    with pytest.raises(ConfigError, match="masks=support"):
        support_values(mapped, ["background", "foreground", "extra"])


def test_overlay_paints_every_class_but_the_first_and_adds_a_legend():
    image = Image.fromarray(np.full((10, 12, 3), 100, np.uint8))
    labels = np.zeros((10, 12), np.int64)
    labels[:, 6:] = 1
    out = np.array(overlay(image, labels, ["background", "foreground"], 0.25))
    assert out.shape[1] == LEGEND_MIN_WIDTH and out.shape[0] > 10
    assert (out[:10, :6] == 100).all()
    green = np.array(overlay_colours(2)[1], np.float64)
    assert np.abs(out[:10, 6:12].astype(np.float64) - (0.75 * 100 + 0.25 * green)).max() <= 0.5
    assert (out[:10, 12:] == 255).all()  # the canvas is widened for the legend, not the image stretched


@pytest.mark.parametrize("overrides, message", [
    (["checkpoint=none"], "checkpoint=none has nothing to predict with"),
    (["adapt.steps=3"], "adapt.steps=3 but there is no support"),
    (["masks=support"], "masks=support needs one labelled support dataset"),
    (["support=/nonexistent/labelled"], "support='/nonexistent/labelled' is not a folder"),
    (["mode=tiles"], "mode='tiles' is not one of resize, slide"),
])
def test_user_errors_name_the_key(tmp_path, checkpoint, overrides, message):
    images = image_folder(tmp_path / "images", bad=False)
    args = [f"checkpoint={checkpoint}", f"images={images}", f"out={tmp_path / 'out'}", *overrides]
    with pytest.raises(ConfigError, match=message):
        predict(*args)
    assert not (tmp_path / "out" / "masks").exists()


def test_images_folder_problems(tmp_path, checkpoint):
    with pytest.raises(ConfigError, match="is not a folder"):
        predict(f"checkpoint={checkpoint}", f"images={tmp_path / 'missing'}", f"out={tmp_path / 'out'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        predict(f"checkpoint={checkpoint}", f"images={tmp_path / 'empty'}", f"out={tmp_path / 'out'}")
    twice = image_folder(tmp_path / "twice", {"a": (8, 8)}, bad=False)
    rgb(8, 8, 0).save(twice / "a.jpg")
    with pytest.raises(DataError, match="a.jpg / a.png|a.png / a.jpg"):
        predict(f"checkpoint={checkpoint}", f"images={twice}", f"out={tmp_path / 'out'}")
