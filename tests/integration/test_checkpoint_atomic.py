"""Checkpoints are written atomically: a SIGKILL mid-save (in a child process) leaves the previous one
loadable. Their permissions and a truncated file: tests/unit/test_checkpoint_atomic.py."""

import signal
import subprocess
import sys
import textwrap
import time

import torch

from metaseg.engine.checkpoint import load_checkpoint, save_checkpoint


def _python(code: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_sigkill_in_the_middle_of_torch_save_keeps_the_old_checkpoint(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    # the child saves step 1, then dies from SIGKILL after writing half of step 2's bytes
    child = _python(f"""
        import os, signal, torch
        from metaseg.engine.checkpoint import save_checkpoint
        path = {str(path)!r}
        save_checkpoint(path, model={{"w": torch.zeros(1000)}}, config={{}}, step=1)
        real_save = torch.save
        def dying_save(obj, f):
            f.write(b"half a checkpoint" * 1000)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        save_checkpoint(path, model={{"w": torch.ones(1000)}}, config={{}}, step=2)
        print("not reached")
    """)
    out, err = child.communicate(timeout=300)
    assert child.returncode == -signal.SIGKILL, err[-2000:]
    assert "not reached" not in out
    stale = list(path.parent.glob(".last.pt.*.tmp"))
    assert len(stale) == 1 and stale[0].stat().st_size >= 17000  # the half-written temporary
    ckpt = load_checkpoint(path)  # the old checkpoint, whole
    assert ckpt["step"] == 1 and torch.equal(ckpt["model"]["w"], torch.zeros(1000))
    # the next save clears the dead process's temporary
    save_checkpoint(path, model={"w": torch.ones(3)}, config={}, step=3)
    assert not list(path.parent.glob(".last.pt.*.tmp"))
    assert load_checkpoint(path)["step"] == 3


def test_sigkill_at_a_random_moment_of_repeated_saves(tmp_path):
    """A writer saving 4 MB checkpoints in a loop, killed from outside: the file is always whole."""
    path = tmp_path / "last.pt"
    child = _python(f"""
        import torch
        from metaseg.engine.checkpoint import save_checkpoint
        weights = {{"w": torch.arange(1_000_000, dtype=torch.float32)}}
        step = 0
        while True:
            step += 1
            save_checkpoint({str(path)!r}, model=weights, config={{"step": step}}, step=step)
            if step == 1:
                print("saved", flush=True)
    """)
    assert child.stdout.readline().strip() == "saved"
    time.sleep(0.3)
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    ckpt = load_checkpoint(path)
    assert ckpt["step"] >= 1 and ckpt["config"] == {"step": ckpt["step"]}
    assert torch.equal(ckpt["model"]["w"], torch.arange(1_000_000, dtype=torch.float32))
