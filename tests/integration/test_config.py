"""metaseg-train stops on a config mistake with one clear line, before any work. The mistakes
themselves, composed and validated in-process: tests/unit/test_config.py."""

from tests.helpers import run_cli


def test_cli_typo_is_one_clear_line_before_any_work(tmp_path):
    out = run_cli("metaseg-train", "meta.inner_lrr=0.1", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode != 0
    assert "inner_lrr" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_user_error_exits_2_with_one_line(tmp_path):
    # named weights on a machine without network or cache (the hub's offline mode, an empty cache)
    out = run_cli("metaseg-train", "experiment=smoke", "model.encoder_weights=imagenet",
                  f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                  env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf-cache")})
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("metaseg-train: error:")]
    assert len(lines) == 1 and "model.encoder_weights='imagenet'" in lines[0] and "HF_HUB_OFFLINE=1" in lines[0]
    assert [line for line in out.stderr.splitlines() if line.strip()] == lines  # nothing else: no hub warnings
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "metrics.json").exists()
