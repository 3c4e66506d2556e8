"""smp model factory, encoder weights (names smp knows, local files) and normalisation choices."""

from metaseg.models.factory import build_model, set_norm

__all__ = ["build_model", "set_norm"]
