"""ANIL, "almost no inner loop" (Raghu et al., 2020): adapt only the last layers in the inner loop.

The inner loop adapts the parameters of ``inner_params`` (module-name patterns; default the
decoder's last block and the segmentation head); every other parameter enters the inner
forward passes as theta itself. The outer step still updates everything: the encoder gets
its meta-gradient through the query loss and, second order, through the features the
adapted head was fitted on. Because the inner gradient is taken with respect to the head
only, the inner backward stops at the first adapted module, and the unrolled graph the
outer backward walks holds the head's steps only: much cheaper than MAML (measured in
docs/algorithms.md). Evaluation adapts the same parameters.

Patterns are dotted module (or parameter) names with ``fnmatch`` globs per segment and
negative indices for "from the end": ``decoder.blocks.-1`` is the last decoder block of a
U-Net whatever its depth; ``segmentation_head`` the 1x1 conv head of any smp model.
"""

from __future__ import annotations

from torch import nn

from metaseg.meta.maml import MAML

DEFAULT_INNER_PARAMS = ("decoder.blocks.-1", "segmentation_head")


class ANIL(MAML):
    """MAML whose inner loop adapts only ``inner_params`` (default: last decoder block and head)."""

    name = "anil"
    default_inner_params = DEFAULT_INNER_PARAMS

    def __init__(self, model: nn.Module, **kwargs):
        if not kwargs.get("inner_params"):
            kwargs["inner_params"] = list(DEFAULT_INNER_PARAMS)
        super().__init__(model, **kwargs)
