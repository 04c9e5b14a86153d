"""Multi-Similarity (docs/methods.md#multi-similarity): ``config.py`` (the recipe's ``method`` section,
light), ``method.py`` (:class:`MS`, its loss and labelled batches). Names of the latter are imported on
first use."""

from mlsctl.methods import forward_names
from mlsctl.methods.ms.config import MSConfig

__all__ = ["MS", "MSConfig"]
__getattr__ = forward_names(__name__, "method")
