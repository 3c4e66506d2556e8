"""Meta-learning algorithms; ``MetaLearner`` is the public entry point."""

from metaseg.meta.maml import MetaLearner, pixel_cross_entropy
from metaseg.meta.precision import Precision

__all__ = ["MetaLearner", "Precision", "pixel_cross_entropy"]
