"""MILE (docs/methods.md#mile): ``config.py`` (the recipe's ``method`` section, light),
``method.py`` (:class:`MILE`, its set encoder and head). Names of the latter are imported on first use."""

from mlsctl.methods import forward_names
from mlsctl.methods.mile.config import MILEConfig

__all__ = ["MILE", "MILEConfig"]
__getattr__ = forward_names(__name__, "method")
