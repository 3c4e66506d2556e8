"""The README's commands and configs, read for tests/unit/test_readme_commands.py (each composes and
sets up) and tests/integration/test_readme_commands.py (each runs at smoke size, slow).

The README's ``bash`` blocks are read into commands (placeholders such as CKPT, DIR, LABELLED,
IMAGES, OUT and DATE/TIME stand for real paths; a trailing ``# stops: MESSAGE`` documents a
command that must stop with MESSAGE), and its ``# conf/GROUP/NAME.yaml`` blocks into configs
its commands use. Every command must be of a known kind, so a new kind of command fails there
until it is tested.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

import metaseg.config  # noqa: F401 - registers the schemas
from tests.helpers import ROOT, SHARED_DATA, folder_dataset

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


def readme_conf(tmp_path: Path) -> list[str]:
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


def placeholders(tmp_path: Path) -> dict[str, str]:
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
