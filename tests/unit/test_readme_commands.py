"""Every command in the README composes and sets up as written, and every shipped config (data mix,
experiment, algorithm) sets up with its own defaults, in seconds.

Each ``metaseg-*`` command of the README (read by tests/readme.py) is composed exactly as its
entry point does, and a training command runs its whole set-up (checks, data built at full size,
validation split, task sampler, held-out sizes) up to the model, with the real datasets listed
rather than decoded; every ``conf/data``, ``conf/experiment`` and ``conf/meta`` choice gets the
same, and each data choice is also decoded at a tiny size. Tests that need ``../shared/data``
skip without it. Each command run at smoke size: tests/integration/test_readme_commands.py (slow).
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import metaseg.data.folder
import metaseg.engine.training.setup
from metaseg.data import build_mix
from metaseg.data.mix import train_names
from metaseg.engine.distributed import check_meta_batch
from metaseg.engine.evaluation.protocol import check_heldout_sizes
from metaseg.engine.evaluation.settings import validate_eval
from metaseg.engine.training.trainer import train
from metaseg.utils.errors import MetasegError
from tests.helpers import BIN, ROOT, SHARED_DATA, folder_dataset
from tests.readme import (ALGORITHMS, COMMANDS, DATA_CONFIGS, EXPERIMENTS, HAVE_DATA, METASEG, NEEDS_DATA,
                          NOT_BUNDLED, NOT_RUN, PROGRAMS, README, README_CONFIGS, compose_job, compose_on_shared_data,
                          hydra_free, message_of, nproc, on_shared_data, plugin_missing,
                          readme_commands, substitute, sweep)


def test_every_readme_command_is_of_a_known_kind():
    unknown = [str(c) for c in COMMANDS if c not in METASEG and c.kind not in NOT_RUN]
    assert not unknown, f"README commands of no known kind (teach kind_of and the tests below): {unknown}"
    assert {c.kind for c in COMMANDS} >= {"make", "metaseg-train", "metaseg-eval", "metaseg-predict",
                                          "metaseg-data", "metaseg-report", "torchrun"}
    assert len(METASEG) >= 15


def test_the_two_commands_agree_with_the_makefile_and_ci():
    text = README.read_text()
    first_screen = "\n".join(text.splitlines()[:40])
    assert "make train" in first_screen and "make test" in first_screen
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^train: .*\n\t\$\(VENV\)/bin/metaseg-train", makefile, flags=re.M)
    assert re.search(r"^test: .*\n\t\$\(PY\) -m pytest", makefile, flags=re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    manual = [c for c in COMMANDS if c.kind == "tests"]
    assert manual and all(c.argv[1:3] == ["-m", "pytest"] for c in manual)  # what make test runs


def test_parsing_keeps_env_comments_and_documented_stops():
    cmds = readme_commands("```bash\nOMP_NUM_THREADS=4 torchrun --standalone -m metaseg.train a=1   # x\n"
                           "pip install \"x[y]\" && metaseg-train b=[1,2]  # stops: Key 'b' not in 'C'\n"
                           "metaseg-eval checkpoint=CKPT \\\n    eval.shots=[1,5]\n```\n")
    assert [c.kind for c in cmds] == ["torchrun", "install", "metaseg-train", "metaseg-eval"]
    assert cmds[0].env == {"OMP_NUM_THREADS": "4"} and cmds[0].args == ["a=1"]
    assert cmds[2].args == ["b=[1,2]"] and cmds[2].stops == "Key 'b' not in 'C'"
    assert cmds[3].args == ["checkpoint=CKPT", "eval.shots=[1,5]"]


def test_the_readme_configs_are_used_by_its_commands():
    assert README_CONFIGS, "the README shows how to add a dataset"
    for group, name, _ in README_CONFIGS:
        assert any(f"{group}={name}" in c.args for c in COMMANDS), f"no README command uses {group}={name}"


# -- a training run's whole set-up, at full size, in a second -----------------------------------
class Listed(torch.utils.data.Dataset):
    """A folder dataset listed (its pairs with their split and groups), not decoded."""

    def __init__(self, name, pairs, *args, **kwargs):
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index):
        raise AssertionError("a listed dataset is not decoded")


class ReachedTheModel(Exception):
    """Raised where training builds the model: every check before it passed."""


@pytest.fixture
def set_up(monkeypatch, tmp_path):
    """``set_up(cfg)``: ``metaseg-train``'s set-up up to the model, on the real file lists."""
    monkeypatch.setattr(metaseg.data.folder, "build_pair_dataset", Listed)

    def model(*args, **kwargs):
        raise ReachedTheModel

    monkeypatch.setattr(metaseg.engine.training.setup, "build_model", model)  # where build_run finds it
    runs = itertools.count()

    def run(cfg) -> None:
        with pytest.raises(ReachedTheModel):
            train(cfg, tmp_path / f"setup{next(runs)}")

    return run


def check_data(cfg, monkeypatch) -> None:
    """What ``metaseg-eval checkpoint=none`` and ``metaseg-data`` build before any model, at full
    size: the held-out datasets (``metaseg-data``: a mix's training ones too), enough images for
    the shots."""
    monkeypatch.setattr(metaseg.data.folder, "build_pair_dataset", Listed)
    mix = build_mix(cfg.data, need_train="eval" not in cfg and bool(train_names(cfg.data)))
    assert mix.heldout or mix.train
    if "eval" in cfg:
        check_heldout_sizes(mix.heldout, cfg.eval)


# -- default suite: every README command composes and sets up -----------------------------------
@pytest.mark.parametrize("cmd", METASEG, ids=str)
def test_readme_command_composes_and_sets_up(cmd, places, readme_conf, set_up, monkeypatch, tmp_path):
    args = substitute(cmd.args, places)
    if cmd.kind == "script":
        source = (ROOT / cmd.argv[1]).read_text()
        flags = [a.split("=")[0] for a in args if a.startswith("--")]
        assert all(f'"{f}"' in source for f in flags), f"{cmd.argv[1]} lacks an option of: {flags}"
        return
    if cmd.kind == "metaseg-report":
        assert len(args) == 1 and Path(args[0]).is_absolute(), "metaseg-report's folder is a placeholder"
        assert (BIN / "metaseg-report").exists()
        return
    config = PROGRAMS[cmd.program]
    problem = plugin_missing(args)
    if problem:
        pytest.skip(problem)
    runs = sweep(args) if "-m" in args else [args]
    for overrides in runs:
        overrides = [*hydra_free(overrides), *readme_conf]
        if cmd.stops:
            with pytest.raises(Exception) as caught:
                cfg = compose_job(config, overrides)
                if config == "train":
                    set_up(cfg)
            assert cmd.stops in message_of(caught.value)
            continue
        cfg = compose_on_shared_data(config, overrides, cwd=tmp_path)
        if config == "train":
            if cmd.kind == "torchrun":
                check_meta_batch(cfg.meta.meta_batch, nproc(cmd))
            if cfg.trainer.device.startswith("cuda") and not torch.cuda.is_available():
                cfg.trainer.device = "cpu"  # a GPU preset: its set-up checks the same on the CPU
            set_up(cfg)
        elif config == "eval":
            validate_eval(cfg.eval)
            if cfg.checkpoint == "none":
                check_data(cfg, monkeypatch)
        elif config == "data_cmd":
            check_data(cfg, monkeypatch)
        else:  # predict
            assert not OmegaConf.missing_keys(cfg), OmegaConf.missing_keys(cfg)
            assert cfg.mode in ("resize", "slide")


# -- default suite: every data config and experiment runs with its own defaults -----------------
@pytest.mark.parametrize("name", DATA_CONFIGS)
def test_data_config_runs_with_its_defaults(name, set_up, monkeypatch, tmp_path):
    cfg = compose_job("train", [f"data={name}"])
    if name in NOT_BUNDLED:  # the user's own download: without data.root it stops, naming the key
        with pytest.raises(MetasegError, match=r"data\.root=DIR"):
            set_up(cfg)
        return
    if name == "folder":  # any images/ + masks/ folder: data.root=DIR
        root = folder_dataset(tmp_path / "folder", n=8, h=24, w=24)
        for config, extra in (("eval", ["checkpoint=none"]), ("data_cmd", [])):  # size 0: the checkpoint's
            check_data(compose_job(config, [f"data={name}", f"data.root={root}", "data.size=16", *extra]),
                       monkeypatch)
        return
    if on_shared_data(cfg.data):
        if not HAVE_DATA:
            pytest.skip(NEEDS_DATA)
        cfg.data.root = str(SHARED_DATA)
    if train_names(cfg.data):  # a mix: metaseg-train with every default
        set_up(cfg)
    else:  # one dataset, held out: what metaseg-eval checkpoint=none and metaseg-data build (same shots)
        check_data(cfg, monkeypatch)
    monkeypatch.undo()  # decoded for real, at a tiny size: files, label maps, patches, validation split
    tiny = cfg.data.copy()
    tiny.max_images, tiny.size, tiny.workers = 2, 16, 2
    mix = build_mix(tiny, need_train=bool(train_names(tiny)), validation=True)
    for ds in {**mix.train, **mix.heldout, **mix.val}.values():
        image, mask = ds[0]
        assert image.shape == (3, 16, 16) and mask.shape == (16, 16)
        assert set(mask.unique().tolist()) <= set(range(mix.num_classes)) | {255}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_runs_with_its_defaults(name, set_up):
    cfg = compose_on_shared_data("train", [f"experiment={name}"])
    if cfg.trainer.device.startswith("cuda") and not torch.cuda.is_available():
        cfg.trainer.device = "cpu"  # the GPU preset's set-up is the same on the CPU
    set_up(cfg)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_algorithm_config_runs_with_its_defaults(name, set_up):
    set_up(compose_job("train", [f"meta={name}"]))


def test_a_patch_mix_brings_its_evaluation_mode_and_the_command_line_wins():
    assert compose_job("eval", ["checkpoint=none", "data=binary_patches"]).eval.mode == "slide"
    assert compose_job("eval", ["checkpoint=none", "data=binary_patches", "eval.mode=resize"]).eval.mode == "resize"
    assert compose_job("eval", ["checkpoint=x.pt"]).eval.mode == "resize"  # data null: the checkpoint's mix
