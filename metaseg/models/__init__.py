"""smp model factory, local weight loading and normalisation choices."""

from metaseg.models.factory import build_model, set_norm

__all__ = ["build_model", "set_norm"]
