"""The one trained run the integration tests share.

``metaseg-train`` runs once per pytest run, as a user types it (tests/helpers.py: SESSION_RUN),
and every test that needs "a trained checkpoint" reads its folder. Under pytest-xdist the
workers share it too (the xdist pattern: a file lock in the temporary folder all workers have
in common; the first worker to arrive trains, the others wait and read). The folder is read
only: a test that continues or changes a run copies it first (helpers.copy_run).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from filelock import FileLock


@dataclass(frozen=True)
class TrainedRun:
    root: Path  # the folder metaseg-train ran from
    run_dir: Path  # its hydra.run.dir, root / "D"
    console: str  # what it printed (stdout + stderr)

    @property
    def last(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

    @property
    def best(self) -> Path:
        return self.run_dir / "checkpoints" / "best.pt"


def _train(root: Path) -> None:
    from tests.helpers import SESSION_RUN, run_cli

    out = run_cli("metaseg-train", *SESSION_RUN, f"hydra.run.dir={root / 'D'}", cwd=root, baseline=True)  # as typed
    if out.returncode != 0:
        (root / "failed.txt").write_text(out.stderr[-3000:])
        return
    (root / "console.txt").write_text(out.stdout + out.stderr)


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> TrainedRun:
    """The shared run: SESSION_RUN trained by ``metaseg-train`` with the random-init baseline."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "trained"
    with FileLock(f"{root}.lock"):
        if not (root / "console.txt").is_file() and not (root / "failed.txt").is_file():
            shutil.rmtree(root, ignore_errors=True)  # a worker that died half-way
            root.mkdir()
            _train(root)
    if (root / "failed.txt").is_file():
        pytest.fail("the shared metaseg-train run failed:\n" + (root / "failed.txt").read_text())
    return TrainedRun(root, root / "D", (root / "console.txt").read_text())
