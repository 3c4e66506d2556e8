"""``metaseg-eval``: score a checkpoint on held-out datasets, zero-shot and after few-shot adaptation."""

from __future__ import annotations

import sys
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import metaseg.config  # noqa: F401 - registers the structured-config schemas
from metaseg.cli import user_errors
from metaseg.engine.evaluation.checkpoint_eval import evaluate_checkpoint


@hydra.main(version_base="1.3", config_path="pkg://metaseg.conf", config_name="eval")
def _main(cfg: DictConfig) -> float:
    with user_errors("metaseg-eval"):
        result = evaluate_checkpoint(cfg, HydraConfig.get().runtime.output_dir)
    return float(result.get("mean", {}).get("adapted_miou", float("nan")))


def data_override_problem(argv: list[str]) -> Optional[str]:
    """``data.KEY=...`` with a checkpoint and no ``data=NAME``: the data group is null then (the
    checkpoint's own mix), so Hydra would fail with an assertion; say what to write instead."""
    given = [a for a in argv if a.startswith(("data.", "+data.", "++data."))]
    if not given or any(a.startswith(("data=", "+data=")) for a in argv) or "checkpoint=none" in argv:
        return None
    if given[0].lstrip("+").startswith("data.root="):
        fix = f"pass data_root={given[0].split('=', 1)[1]} to find the checkpoint's datasets under that folder"
    else:
        fix = "pass data=NAME (a mix of conf/data/) to evaluate another mix, then its data.* keys"
    return (f"{given[0]}: with a checkpoint, data is the checkpoint's own mix (data=null) and has no keys to "
            f"override; {fix}")


def main() -> None:
    problem = data_override_problem(sys.argv[1:])
    if problem:
        print(f"metaseg-eval: error: {problem}", file=sys.stderr)
        sys.exit(2)
    _main()


if __name__ == "__main__":
    main()
