"""Moved to :mod:`mlsctl.methods.refine.neighbours` (only refinement uses it); this name stays importable."""

from mlsctl.methods.refine.neighbours import nearest_neighbours  # noqa: F401 - re-exported

__all__ = ["nearest_neighbours"]
