"""Checkpoints as plain data: tensors, numbers, strings, lists and dicts, config included.

Loaded with ``torch.load(weights_only=True)``, so a checkpoint someone sends you cannot run
code. Written atomically (temporary file in the same folder, flushed to disk, then renamed),
so a crash or a SIGKILL mid-save leaves the previous checkpoint intact, never a truncated one.

A run writes ``<run dir>/checkpoints/last.pt`` every ``trainer.ckpt_every`` steps and
``best.pt`` whenever the held-out metric ``trainer.best_metric`` improves; both hold the whole
training state (see ``metaseg.engine.state``), so either can be resumed or evaluated.
Resuming checks that the checkpoint was written by this metaseg version with the same
model, data, meta and seed settings, and names every key that differs.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch

from metaseg import __version__
from metaseg.engine.state import Stateful, restore
from metaseg.utils.errors import CheckpointError
from metaseg.utils.runtime import atomic_write

log = logging.getLogger(__name__)
FORMAT = 1
LAST, BEST = "last.pt", "best.pt"

# Keys a resumed run may change: how long, where, how often to report, how to evaluate.
# Everything else (data, model, meta, seed, precision, best metric, ...) must match, so that
# the continuation is the run that was started, not another one.
MAY_DIFFER_ON_RESUME = (
    "trainer.resume", "trainer.resume_strict", "trainer.max_steps", "trainer.device", "trainer.threads",
    "trainer.log_every", "trainer.eval_every", "trainer.ckpt_every", "trainer.deterministic",
    "trainer.deterministic_warn_only", "trainer.monitor_tasks", "trainer.patience",
    "eval.*", "data.root", "data.datasets.*.root",
)


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(path: str | os.PathLike, **state: Any) -> None:
    """Write ``state`` (plus format and version) to ``path`` atomically and durably."""
    payload = {"format": FORMAT, "version": __version__, **state}
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


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint={path!r} does not exist (a run writes <run dir>/checkpoints/last.pt)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt, truncated or code-carrying files alike
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint={path!r} cannot be loaded as plain data (weights_only): {first}"
        ) from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"checkpoint={path!r} is not a metaseg checkpoint (no 'model' and 'config')")
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint={path!r} has format {ckpt.get('format')!r}, this metaseg "
            f"({__version__}) reads format {FORMAT}"
        )
    if ckpt.get("version") != __version__:
        log.warning("checkpoint %s was written by metaseg %s, this is %s", path, ckpt.get("version"), __version__)
    return ckpt


def resume_path(resume: Optional[str], run_dir: str | os.PathLike) -> Optional[Path]:
    """Which checkpoint ``trainer.resume`` names: None (fresh run), a file, or a run folder's last.pt.

    ``auto`` is this run folder's ``checkpoints/last.pt`` when it exists, else a fresh start, so
    the same command both starts and continues a run (``hydra.run.dir`` fixed).
    """
    if resume is None or str(resume).strip() in ("", "null", "none", "None"):
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
