"""Checkpoints as plain data: tensors, numbers, strings, lists and dicts, config included.

Loaded with ``torch.load(weights_only=True)``, so a checkpoint someone sends you cannot run
code. Written atomically (temporary file in the same folder, flushed to disk, then renamed),
so a crash or a SIGKILL mid-save leaves the previous checkpoint intact, never a truncated one.

A run writes ``<run dir>/checkpoints/last.pt`` every ``trainer.ckpt_every`` steps and
``best.pt`` whenever the held-out metric ``trainer.best_metric`` improves; both hold the whole
training state (see ``metaseg.engine.state``), so either can be resumed or evaluated.
Resuming checks that the checkpoint was written by this metaseg version with the same
model, data, meta and seed settings, and names every key that differs.

Every checkpoint carries ``digest``: a SHA-256 over the name, type, dtype, shape and bytes of
every tensor and the value of every other entry, checked on load, so a file damaged on disk
or in transfer (which torch would otherwise load with changed numbers) is refused, naming
the file. Checkpoints written before digests existed have none and load as before.

A run folder holds one run: ``claim_run_dir`` refuses to start a fresh run where one already
is (unless it is resumed, or ``trainer.overwrite=true`` clears it first) and locks the folder
for the run's lifetime, so two live runs never write into one folder.
"""

from __future__ import annotations

import errno
import dataclasses
import fnmatch
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch

from metaseg import __version__
from metaseg.engine.state import Stateful, restore
from metaseg.utils.errors import CheckpointError
from metaseg.utils.runtime import atomic_write

log = logging.getLogger(__name__)
FORMAT = 1
LAST, BEST = "last.pt", "best.pt"
DIGEST = "digest"  # the checkpoint's key holding digest(payload)

# Keys a resumed run may change: how long, where, how often to report, how to evaluate.
# Everything else (data, model, meta, seed, precision, best metric, ...) must match, so that
# the continuation is the run that was started, not another one.
MAY_DIFFER_ON_RESUME = (
    "trainer.resume", "trainer.resume_strict", "trainer.overwrite", "trainer.max_steps", "trainer.device",
    "trainer.threads", "trainer.log_every", "trainer.eval_every", "trainer.ckpt_every", "trainer.deterministic",
    "trainer.deterministic_warn_only", "trainer.monitor_tasks", "trainer.patience",
    "eval.*", "data.root", "data.datasets.*.root",
)


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(path: str | os.PathLike, **state: Any) -> None:
    """Write ``state`` (plus format, version and digest) to ``path`` atomically and durably."""
    payload = {"format": FORMAT, "version": __version__, **{k: v for k, v in state.items() if k != DIGEST}}
    payload[DIGEST] = digest(payload)
    path = Path(path)

    def _write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())

    _remove_stale_temporaries(path)
    atomic_write(path, _write)
    try:  # make the rename itself durable; not every filesystem allows opening a directory
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _remove_stale_temporaries(path: Path) -> None:
    """A process killed mid-save leaves ``.<name>.*.tmp`` behind; the next save clears it."""
    if path.parent.is_dir():
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)


def digest(payload: Mapping) -> str:
    """``sha256:<hex>`` over every entry of ``payload`` but ``digest``: names, types, dtypes, shapes, bytes.

    Computed from the loaded objects, not the file, so it does not depend on how torch lays the
    file out; any changed tensor byte or value changes it.
    """
    h = hashlib.sha256()
    _feed(h, "", {k: v for k, v in payload.items() if k != DIGEST})
    return "sha256:" + h.hexdigest()


def _feed(h: Any, name: str, value: Any) -> None:
    if isinstance(value, Mapping):
        h.update(f"{name}:{type(value).__name__}[{len(value)}]\n".encode())
        for key, item in value.items():
            _feed(h, f"{name}/{key!r}", item)
    elif isinstance(value, (list, tuple)):
        h.update(f"{name}:{type(value).__name__}[{len(value)}]\n".encode())
        for i, item in enumerate(value):
            _feed(h, f"{name}/{i}", item)
    elif torch.is_tensor(value):
        t = value.detach().to("cpu").contiguous()
        h.update(f"{name}:tensor {t.dtype} {tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    else:
        h.update(f"{name}:{type(value).__name__}={value!r}\n".encode())


_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


def printable(text: str) -> str:
    """``text`` without terminal escape sequences, other control characters shown as ``\\xNN``."""
    text = _ANSI.sub("", text)
    return "".join(c if c.isprintable() or c in "\n\t" else f"\\x{ord(c):02x}" for c in text)


def load_error_reason(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in one line and without torch's advice
    to retry with ``weights_only=False`` (which would run whatever code the file carries)."""
    text = printable(str(exc)).strip()
    if "Weights only load failed" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = f"it needs {found.group(1)}" if found else "it is not a torch file of plain data"
        return (f"{what}, and metaseg loads only tensors, numbers, strings, lists and dicts, because anything "
                f"else could run code when loaded")
    return text.splitlines()[0].strip() if text else type(exc).__name__


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint={path!r} does not exist (a run writes <run dir>/checkpoints/last.pt)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt, truncated or code-carrying files alike
        raise CheckpointError(f"checkpoint={path!r} cannot be loaded as plain data: {load_error_reason(exc)}") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"checkpoint={path!r} is not a metaseg checkpoint (no 'model' and 'config')")
    if DIGEST in ckpt and ckpt[DIGEST] != digest(ckpt):
        raise CheckpointError(f"checkpoint={path!r} is damaged: its tensors or values no longer match the digest it "
                              f"was saved with; copy it again from its source, or use another checkpoint "
                              f"(last.pt or best.pt of the same run)")
    if not isinstance(ckpt["model"], Mapping) or not isinstance(ckpt["config"], Mapping):
        raise CheckpointError(f"checkpoint={path!r} is not a metaseg checkpoint ('model' and 'config' must be "
                              f"mappings, got {type(ckpt['model']).__name__} and {type(ckpt['config']).__name__})")
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint={path!r} has format {ckpt.get('format')!r}, this metaseg "
            f"({__version__}) reads format {FORMAT}"
        )
    if ckpt.get("version") != __version__:
        log.warning("checkpoint %s was written by metaseg %s, this is %s", path, ckpt.get("version"), __version__)
    return ckpt


def _no_resume(resume: Optional[str]) -> bool:
    return resume is None or str(resume).strip() in ("", "null", "none", "None")


def resume_path(resume: Optional[str], run_dir: str | os.PathLike) -> Optional[Path]:
    """Which checkpoint ``trainer.resume`` names: None (fresh run), a file, or a run folder's last.pt.

    ``auto`` is this run folder's ``checkpoints/last.pt`` when it exists, else a fresh start, so
    the same command both starts and continues a run (``hydra.run.dir`` fixed).
    """
    if _no_resume(resume):
        return None
    if str(resume) == "auto":
        last = checkpoint_dir(run_dir) / LAST
        return last if last.is_file() else None
    path = Path(resume).expanduser()
    if path.is_dir():
        for candidate in (checkpoint_dir(path) / LAST, path / LAST):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"trainer.resume={resume!r} is a folder without checkpoints/last.pt; "
                              f"name a .pt file or a run folder")
    if not path.is_file():
        raise CheckpointError(f"trainer.resume={resume!r} does not exist; name a checkpoint file, a run "
                              f"folder, or use trainer.resume=auto")
    return path


def flatten(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Dotted keys and leaf values of nested dicts (lists are leaves)."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from flatten(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], tree


@functools.lru_cache(maxsize=1)
def _schema_defaults() -> dict:
    """Every key of the training schema with its default, flattened (``meta.inner_lr``: 0.1)."""
    from metaseg.config import DataConfig, EvalConfig, MetaConfig, ModelConfig, PretrainConfig, TrainerConfig

    tree = {"data": dataclasses.asdict(DataConfig(name="")),
            "model": dataclasses.asdict(ModelConfig()), "meta": dataclasses.asdict(MetaConfig()),
            "trainer": dataclasses.asdict(TrainerConfig()), "eval": dataclasses.asdict(EvalConfig()),
            "pretrain": dataclasses.asdict(PretrainConfig())}
    return dict(flatten(tree))


def schema_default(key: str, missing: Any) -> Any:
    """The schema's default of a flattened key (a dataset's own keys: ``DatasetConfig``'s), else ``missing``."""
    from metaseg.config import DatasetConfig

    parts = key.split(".")
    if len(parts) == 4 and parts[:2] == ["data", "datasets"]:
        return dataclasses.asdict(DatasetConfig()).get(parts[3], missing)
    return _schema_defaults().get(key, missing)


def config_differences(saved: Mapping, current: Mapping,
                       may_differ: tuple[str, ...] = MAY_DIFFER_ON_RESUME) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, current value)`` for every key that differs and must not."""
    missing = object()
    a, b = dict(flatten(saved)), dict(flatten(current))
    out = []
    for key in sorted(set(a) | set(b)):
        if any(fnmatch.fnmatchcase(key, pat) for pat in may_differ):
            continue
        va, vb = a.get(key, missing), b.get(key, missing)
        if va is missing and vb == schema_default(key, missing):
            continue  # a key this version added, at its default: the saved run behaved that way
        if va != vb:
            out.append((key, "<absent>" if va is missing else va, "<absent>" if vb is missing else vb))
    return out


def check_resumable(ckpt: Mapping, path: str | os.PathLike, config: Mapping, strict: bool = True) -> None:
    """Refuse (``strict``) or warn about a checkpoint from another version or another config."""
    problems = []
    if ckpt.get("version") != __version__:
        problems.append(f"it was written by metaseg {ckpt.get('version')}, this is {__version__}")
    diffs = config_differences(ckpt.get("config") or {}, config)
    if diffs:
        shown = "; ".join(f"{k}={va!r} in the checkpoint, {vb!r} now" for k, va, vb in diffs[:6])
        more = f" (and {len(diffs) - 6} more)" if len(diffs) > 6 else ""
        problems.append(f"its config differs: {shown}{more}")
    if not problems:
        return
    message = f"cannot resume from checkpoint={os.fspath(path)!r}: " + "; ".join(problems)
    if strict:
        raise CheckpointError(message + ". Resume with the checkpoint's settings, start a fresh run without "
                                        "trainer.resume, or pass trainer.resume_strict=false to continue anyway")
    log.warning("%s; continuing because trainer.resume_strict=false", message)


def resume_training(trainer_cfg: Any, run_dir: str | os.PathLike, config: Mapping,
                    objects: Mapping[str, Optional[Stateful]]) -> int:
    """Restore ``objects`` and the RNG streams from the checkpoint ``trainer.resume`` names.

    Returns the step to continue after (0 for a fresh run). ``config`` is the run's resolved
    config, checked against the checkpoint's before anything is loaded.
    """
    path = resume_path(trainer_cfg.resume, run_dir)
    if path is None:
        if trainer_cfg.resume == "auto":
            log.info("trainer.resume=auto: no %s yet, starting at step 0", checkpoint_dir(run_dir) / LAST)
        return 0
    ckpt = load_checkpoint(path)
    check_resumable(ckpt, path, config, strict=trainer_cfg.resume_strict)
    step = int(ckpt.get("step", -1))
    if step < 0:
        raise CheckpointError(f"checkpoint={os.fspath(path)!r} has no step; it was not written by metaseg-train")
    if step > trainer_cfg.max_steps:
        raise CheckpointError(f"checkpoint={os.fspath(path)!r} is at step {step}, beyond trainer.max_steps="
                              f"{trainer_cfg.max_steps}; raise trainer.max_steps to at least {step}")
    restore(ckpt, objects, os.fspath(path))
    log.info("resumed from %s at step %d of %d", path, step, trainer_cfg.max_steps)
    return step


# -- one run per folder -------------------------------------------------------------------
LOCK = ".train.lock"
METRICS = "metrics.json"
# what metaseg-train writes into its folder; trainer.overwrite=true deletes these first
RUN_OUTPUTS = ("checkpoints", "tb", METRICS, "budget.json", "timing.json", "curve.png")


def finished_or_started(run_dir: Path, stages: Sequence[str] = ()) -> Optional[str]:
    """What says ``run_dir`` (or one of its ``stages`` folders) already holds a run, or None."""
    for folder in (run_dir, *[run_dir / s for s in stages]):
        found = [folder / METRICS] if (folder / METRICS).is_file() else []
        found += sorted(checkpoint_dir(folder).glob("*.pt")) if checkpoint_dir(folder).is_dir() else []
        if found:  # a stage's metrics.json: its first stage is done, the run is not
            done = folder == run_dir and found[0].name == METRICS
            return f"{'a finished' if done else 'an unfinished'} run ({found[0].relative_to(run_dir)})"
    return None


class RunLock:
    """An exclusive ``flock`` on ``<run dir>/.train.lock``, held while the run lives.

    The kernel drops the lock when its process ends, however it ends (SIGKILL included), so a
    lock left by a killed run never blocks the next one and a recycled pid cannot fake a live
    run; the pid in the file only names the holder in the refusal. On a filesystem without
    locks the run goes ahead with a warning, as before.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # not a POSIX system
            log.warning("no file locks here, so nothing stops a second run from writing into %s", self.path.parent)
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise CheckpointError(f"{self.path.parent} is in use by another metaseg-train{holder}: two runs "
                                      f"cannot write into one folder; wait for it to end, or pick another "
                                      f"hydra.run.dir") from None
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
                os.close(fd)
                log.warning("%s: this filesystem has no file locks, so nothing stops a second run from writing "
                            "into the same folder", self.path.parent)
                return self
            try:  # the file may have been removed by a run that just ended: lock the one at the path
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)  # closing drops the lock
            self.fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f" (pid {info['pid']} on {info['host']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def occupied(run_dir: Path, held: str) -> str:
    """The refusal of a fresh run into ``run_dir``, which ``held`` (:func:`finished_or_started`) already holds."""
    return (f"{run_dir} already holds {held}; continue it with trainer.resume=auto, start afresh with "
            f"trainer.overwrite=true (deletes its checkpoints, metrics and tensorboard events), or pick another "
            f"hydra.run.dir")


def claim_run_dir(run_dir: str | os.PathLike, trainer_cfg: Any, stages: Sequence[str] = ()) -> RunLock:
    """Lock ``run_dir`` for this run, refusing a folder that already holds one unless it is resumed.

    A fresh run (``trainer.resume`` null) into a folder with a checkpoint or ``metrics.json``
    would restart from step 1 over the earlier run's files; it stops instead, naming both ways
    on: ``trainer.resume=auto`` continues the run, ``trainer.overwrite=true`` deletes its
    outputs (``RUN_OUTPUTS``, and the ``stages`` folders) and starts afresh. With
    ``trainer.resume`` set nothing changes: the run continues as before.
    """
    run_dir = Path(run_dir)
    overwrite = bool(getattr(trainer_cfg, "overwrite", False))
    resumes = not _no_resume(trainer_cfg.resume)
    if overwrite and resumes:
        raise CheckpointError(f"trainer.overwrite=true starts {run_dir} afresh, but trainer.resume="
                              f"{trainer_cfg.resume} continues a run: drop one of them")
    lock = RunLock(run_dir).acquire()
    try:
        held = None if resumes else finished_or_started(run_dir, stages)
        if held and not overwrite:
            raise CheckpointError(occupied(run_dir, held))
        if held:
            for name in (*RUN_OUTPUTS, *stages):
                target = run_dir / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                elif target.exists() or target.is_symlink():
                    target.unlink()
            log.warning("trainer.overwrite=true: deleted the earlier run's outputs in %s", run_dir)
    except BaseException:
        lock.release()
        raise
    return lock
