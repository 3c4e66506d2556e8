"""Checkpoint files get ordinary permissions; a truncated one is refused with its name. A SIGKILL in the
middle of a save: tests/integration/test_checkpoint_atomic.py."""

import os

import pytest
import torch

from metaseg.engine.checkpoint import load_checkpoint, save_checkpoint


def test_checkpoint_files_get_ordinary_permissions(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    save_checkpoint(tmp_path / "c.pt", model={}, config={}, step=0)
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_a_truncated_file_is_refused_with_its_name(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, model={"w": torch.ones(100)}, config={}, step=1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match="cannot be loaded as plain data") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
