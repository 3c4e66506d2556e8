"""``metaseg-eval``: score a checkpoint on held-out datasets, zero-shot and after few-shot adaptation."""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import metaseg.config  # noqa: F401 - registers the structured-config schemas
from metaseg.cli import user_errors
from metaseg.engine.eval_checkpoint import evaluate_checkpoint


@hydra.main(version_base="1.3", config_path="pkg://metaseg.conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    with user_errors("metaseg-eval"):
        result = evaluate_checkpoint(cfg, HydraConfig.get().runtime.output_dir)
    return float(result.get("mean", {}).get("adapted_miou", float("nan")))


if __name__ == "__main__":
    main()
