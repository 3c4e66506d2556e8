"""Meta-learning algorithms; ``ALGORITHMS`` names them, ``MetaLearner`` is what they share.

Every algorithm is a :class:`MetaLearner` subclass (:mod:`metaseg.meta.learner`: the inner
loop, ``adapt``, the learned step sizes; :mod:`metaseg.meta.base`: the outer step). MAML
(:mod:`metaseg.meta.maml`) and its variants FOMAML, ANIL, Meta-SGD, MLDG and iMAML subclass
:class:`MAML`; Reptile and ERM subclass :class:`MetaLearner`. Build one by its class,
``MAML(model, inner_lr=..., inner_steps=...)``, by name, ``ALGORITHMS["anil"](model, ...)``,
or from a ``MetaConfig``, :func:`metaseg.meta.from_config.make_learner`. The losses are in
:mod:`metaseg.meta.losses`.
"""

from metaseg.meta.anil import ANIL
from metaseg.meta.base import Algorithm, OuterSettings
from metaseg.meta.capability import SecondOrderError, second_order_problem
from metaseg.meta.erm import ERM
from metaseg.meta.fomaml import FOMAML
from metaseg.meta.imaml import IMAML
from metaseg.meta.learner import MetaLearner
from metaseg.meta.losses import LOSSES, ce_dice, pixel_cross_entropy
from metaseg.meta.maml import MAML
from metaseg.meta.metasgd import MetaSGD, StepSizes
from metaseg.meta.mldg import MLDG
from metaseg.meta.precision import Precision
from metaseg.meta.reptile import Reptile
from metaseg.meta.safety import DivergenceError

ALGORITHMS: dict[str, type[MetaLearner]] = {
    cls.name: cls for cls in (MAML, FOMAML, ANIL, MetaSGD, Reptile, MLDG, ERM, IMAML)
}

__all__ = ["ALGORITHMS", "ANIL", "Algorithm", "DivergenceError", "ERM", "FOMAML", "IMAML", "LOSSES", "MAML", "MLDG",
           "MetaLearner", "MetaSGD", "OuterSettings", "Precision", "Reptile", "SecondOrderError", "StepSizes",
           "ce_dice", "pixel_cross_entropy", "second_order_problem"]
