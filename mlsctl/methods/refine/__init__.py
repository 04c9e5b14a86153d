"""Context refinement (docs/methods.md#context-refinement): ``config.py`` (the recipe's ``method``
section, light), ``method.py`` (:class:`Refine`, its feature data and context batches). Names of the latter
are imported on first use."""

from mlsctl.methods import forward_names
from mlsctl.methods.refine.config import RefineConfig

__all__ = ["Refine", "RefineConfig"]
__getattr__ = forward_names(__name__, "method")
