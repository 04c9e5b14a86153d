"""MLS and MoCo-v2 (docs/methods.md#mls-and-moco-v2): ``config.py`` (the recipe's ``method`` section, light),
``ops.py`` (the losses, pure functions), ``method.py`` (:class:`MLS`), ``views.py`` (what ``mlsctl bank
inspect`` shows of its queues). Names of ``method.py`` and ``ops.py`` are imported on first use."""

from mlsctl.methods import forward_names
from mlsctl.methods.mls.config import MLSConfig

__all__ = ["MLS", "MLSConfig"]
__getattr__ = forward_names(__name__, "method", "ops")
