"""Meta-learning algorithms; ``MetaLearner`` is the public entry point.

Every algorithm is a ``MetaLearner`` subclass sharing its inner loop, ``adapt`` and outer
step: ``MetaLearner.create("anil", model, inner_lr=..., inner_steps=...)`` or the class.
"""

from metaseg.meta.anil import ANIL
from metaseg.meta.base import Algorithm, OuterSettings
from metaseg.meta.capability import SecondOrderError, second_order_problem
from metaseg.meta.erm import ERM
from metaseg.meta.fomaml import FOMAML
from metaseg.meta.imaml import IMAML
from metaseg.meta.maml import MetaLearner, pixel_cross_entropy
from metaseg.meta.metasgd import MetaSGD, StepSizes
from metaseg.meta.mldg import MLDG
from metaseg.meta.precision import Precision
from metaseg.meta.reptile import Reptile
from metaseg.meta.safety import DivergenceError

ALGORITHMS: dict[str, type[MetaLearner]] = {
    cls.name: cls for cls in (MetaLearner, FOMAML, ANIL, MetaSGD, Reptile, MLDG, ERM, IMAML)
}

__all__ = ["ALGORITHMS", "ANIL", "Algorithm", "DivergenceError", "ERM", "FOMAML", "IMAML", "MLDG", "MetaLearner",
           "MetaSGD", "OuterSettings", "Precision", "Reptile", "SecondOrderError", "StepSizes",
           "pixel_cross_entropy", "second_order_problem"]
