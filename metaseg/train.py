"""``metaseg-train``: compose ``conf/train.yaml`` with overrides, meta-train, report held-out scores."""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import metaseg.config  # noqa: F401 - registers the structured-config schemas
from metaseg.cli import user_errors
from metaseg.engine.trainer import train


@hydra.main(version_base="1.3", config_path="pkg://metaseg.conf", config_name="train")
def main(cfg: DictConfig) -> float:
    with user_errors("metaseg-train"):
        metrics = train(cfg, HydraConfig.get().runtime.output_dir)
    return float(metrics["objective"])


if __name__ == "__main__":
    main()
