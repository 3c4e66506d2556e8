"""``metaseg-data``: check a dataset or mix, print a summary, write a grid of sample overlays."""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import metaseg.config  # noqa: F401 - registers the structured-config schemas
from metaseg.cli import user_errors
from metaseg.data.check import inspect_data


@hydra.main(version_base="1.3", config_path="pkg://metaseg.conf", config_name="data_cmd")
def main(cfg: DictConfig) -> None:
    with user_errors("metaseg-data"):
        inspect_data(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
