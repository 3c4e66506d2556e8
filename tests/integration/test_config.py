"""metaseg-train, as installed, stops on a user error inside its run (named weights offline) with one
line and exit status 2, and nothing else on stderr. A typo in a key (Hydra's own error, metaseg-train's
main in-process): tests/unit/test_commands.py; the mistakes themselves: tests/unit/test_config.py."""

from tests.helpers import run_cli


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
