"""``metaseg-predict``: adapt a checkpoint to a few labelled images, then segment a folder of images."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import metaseg.config  # noqa: F401 - registers the structured-config schemas
from metaseg.cli import user_errors
from metaseg.engine.prediction.segment import segment_folder


@hydra.main(version_base="1.3", config_path="pkg://metaseg.conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    with user_errors("metaseg-predict"):
        segment_folder(cfg)


if __name__ == "__main__":
    main()
