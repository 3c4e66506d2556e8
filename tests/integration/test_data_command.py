"""metaseg-data as a user types it, on a tiny folder: it summarises and draws it. Its engine
(tests/unit/test_data_command.py), its one-line stop on bad data (tests/unit/test_commands.py)
and every bad-data case (tests/unit/test_data_bad.py) run in-process."""

import json

from tests.helpers import folder_dataset, run_cli


def test_summarises_and_draws_a_folder(tmp_path):
    folder_dataset(tmp_path / "d", n=3)
    out = run_cli("metaseg-data", "data=folder", f"data.root={tmp_path / 'd'}", "samples=2",
                  f"hydra.run.dir={tmp_path / 'ok'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "folder" in out.stdout and "heldout" in out.stdout
    summary = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert summary["datasets"]["folder"]["images"] == 3 and (tmp_path / "ok" / "samples.png").is_file()
