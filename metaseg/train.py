"""``metaseg-train``: compose ``conf/train.yaml`` with overrides, meta-train, report held-out scores."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import metaseg.config  # noqa: F401 - registers the structured-config schemas
from metaseg.cli import user_errors
from metaseg.engine.checkpoint import _no_resume, finished_or_started, occupied
from metaseg.engine.training.stages import STAGE_DIR
from metaseg.engine.training.trainer import train


@hydra.main(version_base="1.3", config_path="pkg://metaseg.conf", config_name="train")
def hydra_main(cfg: DictConfig) -> float:
    """The task Hydra runs (and its sweepers call): train, return the objective."""
    with user_errors("metaseg-train"):
        metrics = train(cfg, HydraConfig.get().runtime.output_dir)
    return float(metrics["objective"])


def occupied_run_dir(argv: list[str]) -> Optional[str]:
    """The refusal of a fresh run into ``hydra.run.dir=`` that already holds one, decided before Hydra
    rewrites that folder's ``.hydra/`` and log (the trainer refuses it too, later, for runs
    whose folder comes from elsewhere); None when the run may start."""
    values = {a.split("=", 1)[0].lstrip("+"): a.split("=", 1)[1] for a in argv if "=" in a}
    if "-m" in argv or "--multirun" in argv or "hydra.run.dir" not in values:
        return None
    if not _no_resume(values.get("trainer.resume")) or values.get("trainer.overwrite", "false").lower() == "true":
        return None
    run_dir = Path(values["hydra.run.dir"])
    held = finished_or_started(run_dir, (STAGE_DIR,)) if run_dir.is_dir() else None
    return occupied(run_dir, held) if held else None


def main() -> None:
    problem = occupied_run_dir(sys.argv[1:])
    if problem:
        print(f"metaseg-train: error: {problem}", file=sys.stderr)
        sys.exit(2)
    hydra_main()


if __name__ == "__main__":
    main()
