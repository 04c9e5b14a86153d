"""Context refinement (docs/methods.md#context-refinement): ``config.py`` (the recipe's ``method``
section, light), ``method.py`` (:class:`Refine`, its feature data and context batches), ``model.py`` (the
refiner, a plain PyTorch module ``refine apply`` loads without the method), ``neighbours.py`` (the exact
k-NN search with self-exclusion that training and ``refine apply`` share). Names of ``method.py`` are
imported on first use; ``refine apply`` and the plots are :mod:`mlsctl.refine`."""

from mlsctl.methods import forward_names
from mlsctl.methods.refine.config import RefineConfig

__all__ = ["Refine", "RefineConfig"]
__getattr__ = forward_names(__name__, "method")
