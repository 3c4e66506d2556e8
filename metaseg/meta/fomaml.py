"""First-order MAML (Finn et al., 2017, section 5.2): no gradient through the inner loop.

The meta-gradient is the query gradient at the adapted weights phi_K, applied to theta as
it is. The inner gradients are taken without a graph, so the outer backward runs through
one forward pass instead of K unrolled steps: about half of MAML's time here, a fraction
of its memory (docs/algorithms.md). Works with every encoder, including those without
second derivatives (MobileNetV3).
"""

from __future__ import annotations

from metaseg.meta.maml import MAML


class FOMAML(MAML):
    """MAML with ``first_order=True`` always (``first_order_only`` makes it so)."""

    name = "fomaml"
    first_order_only = True
