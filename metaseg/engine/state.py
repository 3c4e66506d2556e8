"""The training state a run needs to continue exactly, as plain data, and its restoration.

Exact resume means: a run killed after step s and resumed reaches bit-for-bit the weights an
uninterrupted run reaches (on CPU). That needs every stateful object (model, outer optimizer,
scheduler, grad scaler, task sampler, best-checkpoint tracker, anything an algorithm learns
besides theta) and every random stream (python, numpy's global generator, torch CPU, every
CUDA device). The trainer hands ``capture``/``restore`` a name -> object mapping of things
with ``state_dict``/``load_state_dict``; an algorithm adds its own entry (``meta_state``, ...)
without touching this module.

Work that is not training (held-out evaluation, monitoring, image logging) runs inside
``rng_isolated()``, so how often it runs never shifts the training's random streams: a run
evaluated every 10 steps and one evaluated only at the end train identically, and a resumed
run need not replay evaluations it skipped.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import signal
from typing import Any, Iterator, Mapping, Optional, Protocol

import numpy as np
import torch

from metaseg.utils.errors import CheckpointError, ConfigError

TEST_KILL_ENV = "METASEG_TEST_KILL_AFTER_STEP"


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> Any: ...


# -- random streams ------------------------------------------------------------------
def rng_state() -> dict:
    """Every global random stream, as plain data (tensors, ints, strings)."""
    np_state = np.random.get_state(legacy=False)
    np_state = {**np_state, "state": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                                      "pos": int(np_state["state"]["pos"])}}
    version, internal, gauss = random.getstate()
    state = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss},
        "numpy": np_state,
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    np_state = dict(state["numpy"])
    np_state["state"] = {"key": np_state["state"]["key"].numpy().astype(np.uint32),
                         "pos": int(np_state["state"]["pos"])}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():  # a machine with fewer GPUs restores the ones it has
        for index in range(min(len(cuda), torch.cuda.device_count())):
            torch.cuda.set_rng_state(cuda[index].cpu(), index)


@contextlib.contextmanager
def rng_isolated() -> Iterator[None]:
    """Run a block without moving any global random stream (for evaluation and logging)."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


# -- stateful objects -----------------------------------------------------------------
def capture(objects: Mapping[str, Optional[Stateful]]) -> dict:
    """``{name: obj.state_dict()}`` for every object that is not None, plus the RNG streams."""
    state = {name: obj.state_dict() for name, obj in objects.items() if obj is not None}
    state["rng"] = rng_state()
    return state


def restore(ckpt: Mapping, objects: Mapping[str, Optional[Stateful]], path: str) -> None:
    """Load every object's state from ``ckpt`` and set the RNG streams; a missing entry is an error."""
    missing = [name for name, obj in objects.items() if obj is not None and name not in ckpt]
    if "rng" not in ckpt:
        missing.append("rng")
    if missing:
        raise CheckpointError(f"checkpoint={path!r} lacks {missing}, so training cannot continue exactly "
                              f"(a checkpoint from metaseg-train holds them); start a fresh run")
    for name, obj in objects.items():
        if obj is None:
            continue
        try:
            obj.load_state_dict(ckpt[name])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"checkpoint={path!r}: its {name!r} state does not fit this run: {first}") from exc
    set_rng_state(ckpt["rng"])


# -- determinism ----------------------------------------------------------------------
@contextlib.contextmanager
def deterministic_algorithms(enabled: bool, warn_only: bool = False) -> Iterator[None]:
    """``torch.use_deterministic_algorithms`` for the block, the previous settings restored after.

    An operation without a deterministic implementation raises inside the block; it becomes a
    ``ConfigError`` naming the operation and the two ways out.
    """
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for reproducible GEMMs
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    try:
        yield
    except RuntimeError as exc:
        if "does not have a deterministic implementation" in str(exc):
            first = str(exc).strip().splitlines()[0].split(", but you set")[0]
            raise ConfigError(f"trainer.deterministic=true: {first}; set trainer.deterministic_warn_only=true "
                              f"(warn and continue) or trainer.deterministic=false") from exc
        raise
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[2], before[3]


def honours_determinism(train_fn):
    """Decorate ``train(cfg, ...)``: run it under ``cfg.trainer.deterministic``'s setting."""

    @functools.wraps(train_fn)
    def wrapper(cfg, *args, **kwargs):
        with deterministic_algorithms(cfg.trainer.deterministic, cfg.trainer.deterministic_warn_only):
            return train_fn(cfg, *args, **kwargs)

    return wrapper


# -- test hook ------------------------------------------------------------------------
def kill_if_requested(step: int) -> None:
    """Tests only: SIGKILL this process after step ``$METASEG_TEST_KILL_AFTER_STEP``.

    A real, uncatchable kill (no cleanup, no flush) at a reproducible point, so the resume test
    does not depend on timing.
    """
    target = os.environ.get(TEST_KILL_ENV)
    if target is not None and int(target) == step:
        os.kill(os.getpid(), signal.SIGKILL)
