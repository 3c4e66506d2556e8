"""Every command in the README runs as written, and every shipped config (data mix, experiment,
algorithm) runs with its own defaults.

The README's ``bash`` blocks are read into commands (placeholders such as CKPT, DIR, LABELLED,
IMAGES, OUT and DATE/TIME stand for real paths; a trailing ``# stops: MESSAGE`` documents a
command that must stop with MESSAGE), and its ``# conf/GROUP/NAME.yaml`` blocks into configs
its commands use. Every command must be of a known kind, so a new kind of command fails here
until it is tested.

Default suite (seconds): each ``metaseg-*`` command is composed exactly as its entry point does,
and a training command runs its whole set-up (checks, data built at full size, validation split,
task sampler, held-out sizes) up to the model, with the real datasets listed rather than decoded;
every ``conf/data``, ``conf/experiment`` and ``conf/meta`` choice gets the same, and each data
choice is also decoded at a tiny size. ``slow``: each command runs at smoke size (step counts,
episodes and images shrunk by appended overrides, data from ``../shared/data``) and must exit 0
with its outputs written, or stop with its documented message. Tests that need
``../shared/data`` skip without it.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

import metaseg.config  # noqa: F401 - registers the schemas
import metaseg.data.folder
import metaseg.engine.training.trainer
from metaseg.data import build_mix
from metaseg.data.mix import train_names
from metaseg.engine.distributed import check_meta_batch
from metaseg.engine.evaluation.protocol import check_heldout_sizes
from metaseg.engine.evaluation.settings import validate_eval
from metaseg.engine.training.trainer import train
from metaseg.utils.errors import MetasegError
from tests.conftest import BIN, ROOT
from tests.data_fixtures import SHARED_DATA, folder_dataset

README = ROOT / "README.md"
HAVE_DATA = (SHARED_DATA / "retina_drive").is_dir()
NEEDS_DATA = f"real datasets not found at {SHARED_DATA}"
DATA_CONFIGS = sorted(p.stem for p in (ROOT / "conf" / "data").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
ALGORITHMS = sorted(p.stem for p in (ROOT / "conf" / "meta").glob("*.yaml"))
NOT_BUNDLED = {"voc", "cityscapes", "fss"}  # public datasets the user downloads (data.root=DIR)
PROGRAMS = {"metaseg-train": "train", "metaseg-eval": "eval", "metaseg-predict": "predict",
            "metaseg-data": "data_cmd"}
PLUGINS = {"hparams_search=optuna": "hydra_plugins.hydra_optuna_sweeper",
           "hydra/launcher=joblib": "hydra_plugins.hydra_joblib_launcher",
           "hydra/launcher=slurm": "hydra_plugins.hydra_submitit_launcher"}
# commands the README shows but this file does not run: what runs them instead
NOT_RUN = {"make": "the two commands: make test is the suite itself, make train the default job below",
           "install": "installation", "tests": "the test suite itself", "viewer": "tensorboard, a viewer"}


# -- the README's commands ----------------------------------------------------------------------
@dataclass
class Command:
    text: str  # as the README writes it, without the comment
    env: dict[str, str]
    argv: list[str]
    stops: Optional[str] = None  # the documented message of a command that must stop
    kind: str = field(init=False)

    def __post_init__(self):
        self.kind = kind_of(self.argv)

    @property
    def program(self) -> str:
        """``metaseg-train`` for torchrun's ``-m metaseg.train``, else the console script's name."""
        return "metaseg-train" if self.kind == "torchrun" else Path(self.argv[0]).name

    @property
    def args(self) -> list[str]:
        """The program's own arguments (after torchrun's ``-m metaseg.train``)."""
        if self.kind == "torchrun":
            return self.argv[self.argv.index("-m") + 2:]
        return self.argv[1:]

    def __str__(self) -> str:
        return self.text


def kind_of(argv: list[str]) -> str:
    name = Path(argv[0]).name
    if name == "make":
        return "make"
    if name in ("pip", "pip3") or argv[1:3] == ["-m", "venv"]:
        return "install"
    if argv[1:3] == ["-m", "pytest"] or name == "pytest":
        return "tests"
    if name == "tensorboard":
        return "viewer"
    if name in PROGRAMS or name == "metaseg-report":
        return name
    if name == "torchrun" and argv[argv.index("-m") + 1:][:1] == ["metaseg.train"]:
        return "torchrun"
    if name.startswith("python") and len(argv) > 1 and argv[1].startswith("scripts/"):
        return "script"
    return "unknown"


def comment_of(line: str) -> tuple[str, str]:
    """``(code, comment)``: the line split at its first ``#`` outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def readme_commands(text: Optional[str] = None) -> list[Command]:
    text = README.read_text() if text is None else text
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            code, comment = comment_of(line)
            if not code.strip():
                continue
            stops = comment[len("stops:"):].strip() if comment.startswith("stops:") else None
            for part in " ".join(shlex.split(code)).split(" && "):
                tokens = shlex.split(part)
                env = {}
                while tokens and re.fullmatch(r"[A-Z_]+=\S*", tokens[0]):
                    key, value = tokens.pop(0).split("=", 1)
                    env[key] = value
                commands.append(Command(part, env, tokens, stops))
    return commands


COMMANDS = readme_commands()
# the README's own config files (a ```yaml block whose first line is "# conf/GROUP/NAME.yaml")
README_CONFIGS = re.findall(r"^```yaml\n# conf/(\w+)/(\w+)\.yaml\n(.*?)^```", README.read_text(), flags=re.M | re.S)
METASEG = [c for c in COMMANDS if c.kind in (*PROGRAMS, "torchrun", "metaseg-report", "script")]


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


# -- placeholders and composition ---------------------------------------------------------------
@pytest.fixture
def readme_conf(tmp_path) -> list[str]:
    """The README's own configs on Hydra's search path (as if saved under ``conf/``), with tiny
    folders for the datasets they name under ``tmp_path`` (their roots are relative to the
    working folder): the overrides that add them to a command."""
    conf = tmp_path / "readme_conf"
    for group, name, body in README_CONFIGS:
        (conf / group).mkdir(parents=True, exist_ok=True)
        (conf / group / f"{name}.yaml").write_text(body)
        if group == "data":
            spec = OmegaConf.create(body)
            for ds in spec.datasets.values():  # 30 images: 6 validation (5 shots + 1) and 24 to train on
                folder_dataset(tmp_path / spec.root / ds.root, n=30, h=16, w=16)
    return [f"hydra.searchpath=[file://{conf}]"] if README_CONFIGS else []


def test_the_readme_configs_are_used_by_its_commands():
    assert README_CONFIGS, "the README shows how to add a dataset"
    for group, name, _ in README_CONFIGS:
        assert any(f"{group}={name}" in c.args for c in COMMANDS), f"no README command uses {group}={name}"


@pytest.fixture
def places(tmp_path) -> dict[str, str]:
    """Real values for the README's placeholders, under ``tmp_path``."""
    folder = folder_dataset(tmp_path / "labelled", n=8, h=24, w=24)
    return {"CKPT": str(tmp_path / "run" / "checkpoints" / "best.pt"), "DIR": str(folder),
            "LABELLED": str(folder), "IMAGES": str(folder / "images"), "OUT": str(tmp_path / "out"),
            "outputs/multirun/DATE/TIME": str(tmp_path / "sweep"), "HOST0": "127.0.0.1"}


def substitute(args: list[str], places: dict[str, str]) -> list[str]:
    out = []
    for arg in args:
        for name, value in places.items():
            arg = re.sub(rf"(?<![\w/.]){re.escape(name)}(?![\w/])", value, arg)
        out.append(arg)
    return out


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def plugin_missing(args: list[str]) -> Optional[str]:
    """Why a command cannot run here: it names a Hydra plugin of an optional extra not installed."""
    for arg, module in PLUGINS.items():
        if arg in args and not installed(module):
            return f"{arg} needs {module} (an optional extra)"
    return None


def nproc(cmd: Command) -> int:
    return int(next(a for a in cmd.argv if a.startswith("--nproc_per_node")).split("=")[1])


def sweep(args: list[str]) -> list[list[str]]:
    """The runs of ``metaseg-train -m ARGS``: Hydra's basic sweeper's grid, one override list per run."""
    parsed = OverridesParser.create().parse_overrides([a for a in args if a not in ("-m", "--multirun")])
    axes = []
    for o in parsed:
        key = o.get_key_element()
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        axes.append([f"{key}={v}" for v in values])
    return [list(run) for run in itertools.product(*axes)]


def hydra_free(args: list[str]) -> list[str]:
    """The job's overrides: Hydra's own (``hydra.*``, ``hydra/...``) do not change the job's config."""
    return [a for a in args if not a.startswith(("hydra.", "hydra/"))]


def compose_job(config: str, overrides: list[str]):
    with initialize_config_module(config_module="metaseg.conf", version_base="1.3"):
        return compose(config_name=config, overrides=overrides)


def message_of(exc: BaseException) -> str:
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def on_shared_data(cfg_data) -> bool:
    root = cfg_data.get("root") if not OmegaConf.is_missing(cfg_data, "root") else None
    return root is not None and Path(root).as_posix().rstrip("/").endswith("shared/data")


def compose_on_shared_data(config: str, overrides: list[str], cwd: Optional[Path] = None):
    """The composed config, its ``data.root`` at the real datasets when it reads them (the ready
    configs' default ``../shared/data`` is relative to where the command runs; skips without them),
    or else a relative root taken from ``cwd``, the command's working folder."""
    cfg = compose_job(config, overrides)
    data = cfg.get("data")
    if data is not None and on_shared_data(data):
        if not HAVE_DATA:
            pytest.skip(NEEDS_DATA)
        data.root = str(SHARED_DATA)
    elif data is not None and cwd is not None and data.root and not Path(data.root).is_absolute():
        data.root = str(cwd / data.root)
    return cfg


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

    monkeypatch.setattr(metaseg.engine.training.trainer, "build_model", model)
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


# -- slow: every README command runs at smoke size ----------------------------------------------
def smoke(config: str, cfg, given: set[str], out: Path, multirun: bool) -> list[str]:
    """Overrides that shrink a run of ``cfg`` to seconds; keys the command sets itself stay, except
    the sizes (steps, episodes, images) and where it writes."""
    o: dict[str, str] = {}
    e = cfg.get("eval")
    if config == "train":
        o.update({"trainer.max_steps": "2", "trainer.eval_every": "0", "trainer.ckpt_every": "1",
                  "trainer.log_every": "1", "trainer.monitor_tasks": "0", "trainer.device": "cpu",
                  "trainer.threads": "1"})
        if cfg.pretrain.steps:
            o["pretrain.steps"] = "1"
        if cfg.meta.inner_steps > 1 and "meta.inner_steps" not in given:
            o["meta.inner_steps"] = "1"
    if config in ("train", "eval") and e is not None:
        if config == "eval":
            o["device"] = "cpu"
        if e.episodes:
            o["eval.episodes"] = "1"
        o.update({"eval.max_images": "2", "eval.pictures": "1"})
        if e.adapt_steps:
            o["eval.adapt_steps"] = "1"
        if e.val_episodes:
            o["eval.val_episodes"] = "1"
        if e.curve_steps:
            o["eval.curve_steps"] = "[0,1]"
        if e.tune:
            o.update({"eval.tune_steps": "[1]", "eval.tune_lrs": f"[{e.tune_lrs[0]}]", "eval.tune_episodes": "1"})
        if e.mode == "slide":
            o["eval.stride"] = "64"
    if config == "predict":
        o.update({"device": "cpu", "workers": "1"})
        if cfg.support is not None:  # zero-shot prediction refuses adaptation settings
            o["adapt.steps"] = "1"
    if config == "data_cmd":
        o["samples"] = "1"
    if cfg.get("data") is not None:
        o["data.workers"] = "2"
        if on_shared_data(cfg.data):
            o["data.root"] = str(SHARED_DATA)
    if config != "predict":
        o["hydra.sweep.dir" if multirun else "hydra.run.dir"] = str(out)
    return [f"{k}={v}" for k, v in o.items()]


def run(argv: list[str], cwd: Path, env: Optional[dict] = None, timeout: int = 1200):
    full_env = {**os.environ, **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.fixture(scope="module")
def default_checkpoint(tmp_path_factory) -> Path:
    """The default job (``metaseg-train`` with no arguments) at smoke size: CKPT of the README."""
    run_dir = tmp_path_factory.mktemp("default_job")
    cfg = compose_job("train", [])
    out = run([str(BIN / "metaseg-train"), *smoke("train", cfg, set(), run_dir, False)], cwd=run_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir / "checkpoints" / "best.pt"


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory) -> Path:
    """A finished sweep folder for ``metaseg-report``."""
    root = tmp_path_factory.mktemp("sweep")
    out = run([str(BIN / "metaseg-train"), "-m", "experiment=smoke", "trainer.max_steps=1", "trainer.device=cpu",
               "seed=0,1", f"hydra.sweep.dir={root}"], cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("cmd", METASEG, ids=str)
def test_readme_command_runs(cmd, request, tmp_path):
    places, readme_conf = request.getfixturevalue("places"), request.getfixturevalue("readme_conf")
    if "CKPT" in cmd.text:
        places["CKPT"] = str(request.getfixturevalue("default_checkpoint"))
    if "DATE/TIME" in cmd.text:
        places["outputs/multirun/DATE/TIME"] = str(request.getfixturevalue("smoke_sweep"))
    args = substitute(cmd.args, places)
    if cmd.kind == "script":
        out = run([str(BIN / "python"), str(ROOT / cmd.argv[1]), "--help"], cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        flags = [a.split("=")[0] for a in args if a.startswith("--")]
        assert all(f in out.stdout for f in flags), (flags, out.stdout)
        return
    if cmd.kind == "metaseg-report":
        out = run([str(BIN / "metaseg-report"), *args], cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        assert (Path(args[0]) / "report.md").is_file()
        return
    problem = plugin_missing(args)
    if problem:
        pytest.skip(problem)
    config = PROGRAMS[cmd.program]
    multirun = "-m" in args
    first = [*hydra_free(sweep(args)[0] if multirun else args), *readme_conf]
    if cmd.stops:
        out = run([str(BIN / cmd.program), *args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
        assert out.returncode != 0 and cmd.stops in out.stderr, out.stderr[-3000:]
        return
    cfg = compose_on_shared_data(config, first, cwd=tmp_path)
    given = {a.split("=", 1)[0] for a in args if "=" in a}
    target = tmp_path / ("sweep" if multirun else "run")
    extra = [*smoke(config, cfg, given, target, multirun), *readme_conf]
    env = dict(cmd.env)
    if cmd.kind == "torchrun":
        gpu = "trainer.device=cpu" not in args
        if gpu and torch.cuda.device_count() < nproc(cmd):
            pytest.skip(f"needs {nproc(cmd)} GPUs")
        if gpu:
            extra = [x for x in extra if not x.startswith("trainer.device=")]
        env["OMP_NUM_THREADS"] = "1"
        argv = [str(BIN / "torchrun"), *cmd.argv[1:cmd.argv.index("-m") + 2], *args, *extra]
    else:
        argv = [str(BIN / cmd.program), *args, *extra]
    out = run(argv, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    if config == "train":
        runs = sorted(target.glob("*/metrics.json")) if multirun else [target / "metrics.json"]
        assert runs and all(json.loads(r.read_text())["objective"] is not None for r in runs)
        assert len(runs) == (len(sweep(args)) if multirun else 1)
    elif config == "eval":
        assert (target / "eval.json").is_file()
    elif config == "predict":
        result = json.loads((Path(places["OUT"]) / "predict.json").read_text())
        assert len(list((Path(places["OUT"]) / "masks").glob("*.png"))) == 8, result
    else:
        assert (target / "summary.json").is_file()
