"""What the tests share: configs as the commands compose them, the installed commands, tiny
on-disk datasets, tiny networks and tasks, and small readers of what a run writes.

A plain module (not a test module, not a conftest): test files import from here and never
from each other. Fixtures live in ``tests/conftest.py`` (both tiers) and
``tests/integration/conftest.py`` (the one trained run the integration tests share).
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

import metaseg.config  # noqa: F401 - registers the schemas
from metaseg.config import EvalConfig, ModelConfig
from metaseg.data.view import SegmentationDataset

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHARED_DATA = ROOT.parent / "shared" / "data"  # ../shared/data from the repository root
CPU = torch.device("cpu")

# -- configs ------------------------------------------------------------------------------------
TINY = ["experiment=smoke"]
# The random-init baseline (eval.baseline, on for users) doubles a run's final evaluation; tests pay
# for it only where they test it: they pass eval.baseline=true (or run_cli(..., baseline=True)).
NO_BASELINE = "eval.baseline=false"
SMALL_DECODER = "model.extra.decoder_channels=[16,8,8]"  # smp's U-Net with a lighter decoder


def without_baseline(overrides) -> list[str]:
    """``overrides`` with ``eval.baseline=false`` unless they set ``eval.baseline`` themselves."""
    overrides = list(overrides)
    if any(o.lstrip("+~").startswith("eval.baseline=") for o in overrides):
        return overrides
    return [*overrides, NO_BASELINE]


_COMPOSED: dict = {}  # (name, overrides) -> config: composing takes a good fraction of a second, a copy not


def compose_cfg(name: str = "train", overrides=()):
    """``conf/NAME.yaml`` with ``overrides`` as the commands compose it, without the baseline (above):
    a fresh copy each call (the same overrides are composed once per process)."""
    if name in ("train", "eval"):
        overrides = without_baseline(overrides)
    key = (name, tuple(overrides))
    if key not in _COMPOSED:
        with initialize_config_module(config_module="metaseg.conf", version_base="1.3"):
            _COMPOSED[key] = compose(config_name=name, overrides=list(overrides))
    return copy.deepcopy(_COMPOSED[key])


def seeded_checkpoint(path: Path, cfg, seed: int, step: int) -> Path:
    """A checkpoint of ``cfg``'s model at weights drawn by ``seed``: evaluation and prediction need
    only weights, classes and a config, not training."""
    from metaseg.engine.checkpoint import save_checkpoint
    from metaseg.models.factory import build_model

    torch.manual_seed(seed)
    model = build_model(cfg.model, len(cfg.data.classes))
    save_checkpoint(path, model=model.state_dict(), step=step, config=OmegaConf.to_container(cfg, resolve=True),
                    classes=list(cfg.data.classes))
    return path


# -- the trained run the integration tests share -------------------------------------------------
# ``metaseg-train`` as a user types it (with the random-init baseline) at smoke size: 4 outer steps,
# evaluations and checkpoints every 2 (experiment=smoke), so best.pt picks between two; alpha and
# beta away from their defaults, so a reader can tell they came from the checkpoint.
# tests/integration/conftest.py trains it once per pytest run (once for all xdist workers);
# a test that continues it composes the same config: compose_cfg("train", [*SESSION_RUN, ...]).
SESSION_RUN = ["experiment=smoke", "trainer.device=cpu", "trainer.threads=1", "meta.inner_lr=0.05",
               "meta.outer_lr=0.003", "eval.pictures=2"]
SESSION_STEPS = 4  # experiment=smoke's trainer.max_steps
SESSION_EVALS = [2, 4]  # the steps it evaluates at (experiment=smoke: trainer.eval_every=2, and the last)


# -- the installed commands ---------------------------------------------------------------------
def run_cli(prog: str, *args: str, cwd, timeout=600, env=None, baseline=False) -> subprocess.CompletedProcess:
    """Run an installed console script from ``cwd`` (not the repo), as a user would; ``metaseg-train``
    and ``metaseg-eval`` without the random-init baseline unless ``baseline`` (then ``args`` as given).
    One torch thread (OMP_NUM_THREADS=1, unless ``env`` says otherwise): the suite runs on two
    pytest-xdist workers, and a command with a thread per core beside them would oversubscribe."""
    if prog in ("metaseg-train", "metaseg-eval") and not baseline:
        args = tuple(without_baseline(args))
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([str(BIN / prog), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def hydra_task(task, config_name: str, overrides, output_dir: Path):
    """A command's Hydra task function (``@hydra.main``-decorated ``task``) called in-process on
    ``conf/CONFIG_NAME.yaml`` with ``overrides``, writing to ``output_dir``: what the command runs once
    Hydra has composed its config and set up its run folder, without a new interpreter."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    overrides = without_baseline(overrides) if config_name in ("train", "eval") else list(overrides)
    with initialize_config_module(config_module="metaseg.conf", version_base="1.3"):
        cfg = compose(config_name, overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)  # what @hydra.main sets up before calling the task
    with open_dict(cfg):
        del cfg["hydra"]
    try:
        return task.__wrapped__(cfg)
    finally:
        HydraConfig.instance().cfg = None


def load_script(name: str):
    """``scripts/NAME.py`` as a module (once per process), its folder on ``sys.path`` as when it runs
    (a script imports its siblings, e.g. step_cost.py)."""
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# scripts/fair_compare.py at tiny sizes (2 outer steps, 32 px, 2 + 2 images per task, one episode),
# through its own options and --override
FAIR_COMPARE_TINY = [
    "--steps", "2", "--episodes", "1", "--val-episodes", "1", "--tune-episodes", "1", "--lrs", "0.1", "0.3",
    "--ksteps", "1", "--fixed", "0.1", "1", "--shots", "2", "--evals", "1",
    "--override", "data.size=32", *[f"data.datasets.synth_{i}.num_images={16 if i < 4 else 12}" for i in range(6)],
    "meta.shots=2", "meta.query=2", "meta.inner_steps=2", "eval.batch_size=8", "eval.max_images=4"]


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """``(step, value)`` of a run's tensorboard scalar ``tag``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a run folder to continue or change (the shared trained run is read only)."""
    shutil.copytree(src, dst)
    return dst


# -- the real datasets (../shared/data), when present -------------------------------------------
HAVE_REAL_DATA = (SHARED_DATA / "retina_drive").is_dir()
needs_real_data = pytest.mark.skipif(not HAVE_REAL_DATA, reason=f"real datasets not found at {SHARED_DATA}")
REAL_ROOT = f"data.root={SHARED_DATA}"
# 10 images a dataset, 3 of them for validation
REAL_TINY_DATA = ["data.max_images=10", "data.val_fraction=0.3", "data.size=32", "data.workers=2"]
REAL_TINY_RUN = ["meta.shots=2", "meta.query=2", "meta.inner_steps=1", "meta.meta_batch=2", "trainer.max_steps=2",
                 "trainer.eval_every=0", "trainer.device=cpu", "eval.shots=2", "eval.episodes=1", SMALL_DECODER]


# -- tiny on-disk datasets -----------------------------------------------------------------------
def rgb(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def half_mask(h: int, w: int, fg: int = 255, bg: int = 0) -> np.ndarray:
    """Left half ``fg``, right half ``bg``: easy to check after resizing."""
    m = np.full((h, w), bg, dtype=np.uint8)
    m[:, : w // 2] = fg
    return m


def folder_dataset(root: Path, n: int = 4, h: int = 16, w: int = 20, *, masks: Optional[list] = None,
                   ext: str = ".png", splits: Optional[list[str]] = None,
                   groups: Optional[dict[str, list[str]]] = None) -> Path:
    """``root/images/img{i}`` + ``root/masks/img{i}.png`` (binary half masks unless ``masks`` given)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rgb(h, w, i).save(root / "images" / f"img{i}{ext}")
        mask = masks[i] if masks is not None else half_mask(h, w)
        Image.fromarray(mask).save(root / "masks" / f"img{i}.png")
    if splits is not None:
        (root / "splits.csv").write_text("stem,split\n" + "".join(f"img{i},{s}\n" for i, s in enumerate(splits)))
    if groups is not None:
        cols = list(groups)
        rows = "".join(f"img{i}," + ",".join(groups[c][i] for c in cols) + "\n" for i in range(n))
        (root / "groups.csv").write_text("stem," + ",".join(cols) + "\n" + rows)
    return root


def image_folder(root: Path, sizes=None, bad=True) -> Path:
    """Images of several sizes (``sizes``: stem -> (W, H); stem ``b`` a JPEG), plus an unreadable
    'image' and a file that is no image (``bad``): what metaseg-predict is pointed at."""
    sizes = {"a": (20, 16), "b": (47, 33), "c": (32, 32)} if sizes is None else sizes
    root.mkdir(parents=True, exist_ok=True)
    for i, (stem, (w, h)) in enumerate(sizes.items()):
        rgb(h, w, 10 + i).save(root / f"{stem}{'.jpg' if stem == 'b' else '.png'}")
    if bad:
        (root / "broken.png").write_bytes(b"not an image")
        (root / "notes.txt").write_text("not an image either")
    return root


def stripes(h: int, w: int) -> np.ndarray:
    """Vertical 1-pixel lines every 4 columns: thin structure that a resize to 16 px would blur away."""
    m = np.zeros((h, w), dtype=np.uint8)
    m[:, ::4] = 255
    return m


VESSELS = {"a": "retina_drive", "b": "retina_stare", "c": "retina_chasedb1"}  # binary_patches' vessel sets


def vessel_folders(root: Path, n: int = 8) -> Path:
    """Three tiny vessel-like folder datasets (1-px stripes) under ``root``, named as binary_patches' sets."""
    for key, (h, w) in {"a": (40, 48), "b": (36, 60), "c": (50, 50)}.items():
        folder_dataset(root / VESSELS[key], n=n, h=h, w=w, masks=[stripes(h, w)] * n)
    return root


def patch_cfg(root, *extra):
    """The study's mix (data=binary_patches) on the three tiny vessel sets in ``root``, 16 px patches."""
    with initialize_config_module(config_module="metaseg.conf", version_base="1.3"):
        return compose("train", ["data=binary_patches", f"data.root={root}", "data.size=16",
                                 f"data.heldout=[{VESSELS['c']}]", f"data.train=[{VESSELS['a']},{VESSELS['b']}]",
                                 NO_BASELINE, *extra])


# -- tiny networks and tasks for the meta-learners -----------------------------------------------
def tiny_net(classes=3, dtype=torch.float64):
    """Two 3 x 3 convolutions with BatchNorm and a 1 x 1 head: float64 for exactness checks."""
    from metaseg.models import set_norm

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Tanh(),
        nn.Conv2d(6, classes, 1),
    )
    return set_norm(net, "batch").to(dtype)


def task(classes=3, n=3, size=8, dtype=torch.float64, seed=1):
    """``(support, query)``: two random batches of images and masks, a few pixels ignored."""
    g = torch.Generator().manual_seed(seed)

    def batch():
        x = torch.randn(n, 3, size, size, generator=g, dtype=dtype)
        y = torch.randint(0, classes, (n, size, size), generator=g)
        y[0, 0, :3] = 255  # some ignored pixels
        return x, y
    return batch(), batch()


def loss_fn(logits, y):
    return F.cross_entropy(logits, y, ignore_index=255)


HUB_STATS = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}  # the hub fixture's: not ImageNet's, from the file
SMALL_UNET = ModelConfig(extra={"encoder_depth": 3, "decoder_channels": [16, 8, 8]})


def close(g, ref):
    """(relative error, cosine, norm ratio) of a low-precision gradient against fp32."""
    return (float((g - ref).norm() / ref.norm()), float((g * ref).sum() / g.norm() / ref.norm()),
            float(g.norm() / ref.norm()))


def fp16_on_cpu() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.nn.functional.conv2d(torch.randn(1, 1, 4, 4), torch.randn(1, 1, 3, 3))
        return True
    except RuntimeError:
        return False


def one_step(name, mode, scale=1024.0):
    """theta after one meta_step through the GradScaler path, with plain SGD as outer optimizer."""
    from metaseg.meta import ALGORITHMS, OuterSettings, Precision

    model = tiny_net(dtype=torch.float32)
    support, query = task(dtype=torch.float32, size=16)
    kw = {"inner_params": ["-1"]} if name == "anil" else {}
    precision = Precision(mode, init_scale=scale)
    learner = ALGORITHMS[name](model, inner_lr=0.1, inner_steps=2, precision=precision,
                               outer=OuterSettings(lr=0.05, meta_batch=1), **kw)
    opt = torch.optim.SGD(learner.parameters(), lr=0.05)
    scaler = precision.grad_scaler()
    sampler = type("S", (), {"sample": lambda self: type("T", (), {"support": support, "query": query})()})()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    stats = learner.meta_step(sampler, opt, scaler, 1)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return after - before, stats, learner, scaler


# Budget hand counts: meta_batch tasks of SHOTS support and QUERY query images
MB, SHOTS, QUERY = 2, 2, 2


def budget_count(algorithm, inner_steps, log, backend="higher"):
    """Images through forward and backward passes in one meta_step of ``algorithm`` at smoke size."""
    from metaseg.data import build_mix
    from metaseg.data.tasks import TaskSampler
    from metaseg.engine.training.budget import Budget
    from metaseg.meta.from_config import make_learner
    from metaseg.meta.precision import Precision
    from metaseg.models.factory import build_model
    from metaseg.utils.runtime import seed_everything

    cfg = compose_cfg("train", [*TINY, f"meta={algorithm}", f"meta.inner_steps={inner_steps}",
                                f"meta.backend={backend}", f"meta.meta_batch={MB}", f"meta.shots={SHOTS}",
                                f"meta.query={QUERY}"])
    mix = build_mix(cfg.data)
    seed_everything(0)
    model = build_model(cfg.model, mix.num_classes)
    learner = make_learner(model, cfg.meta, Precision("32"), max_steps=2)
    sampler = TaskSampler(mix.train, mix.weights, SHOTS, QUERY, seed=0)
    optimizer, scaler = learner.make_optimizer(), Precision("32").grad_scaler()
    budget = Budget(model)
    model(torch.zeros(2, 3, 32, 32))  # outside counting(): not counted
    with budget.counting():
        learner.meta_step(sampler, optimizer, scaler, 1, log=log)
    return budget.counts()


# -- the held-out protocol on tiny networks -------------------------------------------------------
class TinyNet(nn.Module):
    """A two-layer conv net: enough to adapt, fast enough for many episodes on a CPU."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, classes, 1))

    def forward(self, x):
        return self.body(x)


def make_learner(seed=0):
    """MAML (K = 2, alpha = 0.5) on a seeded TinyNet."""
    from metaseg.meta import MAML

    torch.manual_seed(seed)
    return MAML(TinyNet(), inner_lr=0.5, inner_steps=2)


def synthetic_heldout(images: int = 12):
    """A held-out synthetic domain (4 classes, 32 px), normalised as the smoke mix is."""
    from metaseg.data.mix import Normalized
    from metaseg.data.synthetic import SyntheticDomain

    return Normalized(SyntheticDomain(4, images, 32, seed=0), [0.5] * 3, [0.25] * 3)


def eval_cfg(**kw):
    base = dict(shots=[1, 2], episodes=3, batch_size=4, pictures=0)
    return OmegaConf.structured(EvalConfig(**{**base, **kw}))


def as_json(obj):
    import json

    from metaseg.utils.runtime import _plain

    return json.dumps(_plain(obj), sort_keys=True)


class FullRes(SegmentationDataset):
    """Samples at 16 x 16; ``full_resolution`` at the original, larger size. Label = channel 0 > 0."""

    sizes = [(40, 56), (16, 16), (23, 70), (33, 33)]

    def __len__(self):
        return len(self.sizes)

    def full_resolution(self, index):
        g = torch.Generator().manual_seed(index)
        image = torch.randn(3, *self.sizes[index], generator=g)
        return image, (image[0] > 0).long()

    def __getitem__(self, index):
        image, _ = self.full_resolution(index)
        small = torch.nn.functional.interpolate(image[None], size=(16, 16), mode="bilinear")[0]
        return small, (small[0] > 0).long()
