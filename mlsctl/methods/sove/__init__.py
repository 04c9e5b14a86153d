"""SOVE (docs/methods.md#sove): ``config.py`` (the recipe's ``method`` section, light), ``ops.py``
(judges and losses, pure functions), ``method.py`` (:class:`SOVE`). Names of the last two are
imported on first use."""

from mlsctl.methods import forward_names
from mlsctl.methods.sove.config import SOVEConfig

__all__ = ["SOVE", "SOVEConfig"]
__getattr__ = forward_names(__name__, "method", "ops")
