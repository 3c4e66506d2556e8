"""A built wheel ships conf/ inside the package, and its commands find it from any directory."""

import os
import subprocess
import sys
import zipfile

import pytest

from tests.helpers import ROOT


def build_wheel(dist):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist), str(ROOT)], check=True, capture_output=True, timeout=600)
    return next(dist.glob("metaseg_learn-*.whl"))  # the distribution name (the import package is metaseg)


def test_wheel_ships_the_configs(tmp_path):
    names = set(zipfile.ZipFile(build_wheel(tmp_path / "dist")).namelist())
    shipped = {f"metaseg/conf/{p.relative_to(ROOT / 'conf').as_posix()}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert len(shipped) >= 6 and "metaseg/conf/train.yaml" in shipped
    assert shipped <= names, f"YAML missing from the wheel (list its group in pyproject's packages): {shipped - names}"
    assert "metaseg/conf/__init__.py" in names


@pytest.mark.slow  # installs the wheel and trains from it: ~15 s on two idle cores
def test_wheel_installed_elsewhere_runs_its_command(tmp_path):
    wheel = build_wheel(tmp_path / "dist")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=600)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import metaseg, metaseg.conf; print(metaseg.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(target))  # the wheel's copy, not the checkout
    out = subprocess.run([str(target / "bin" / "metaseg-train"), "experiment=smoke", "trainer.max_steps=1",
                          "trainer.device=cpu", "eval.episodes=1", f"hydra.run.dir={work / 'run'}"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (work / "run" / "metrics.json").is_file()
