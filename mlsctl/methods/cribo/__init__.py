"""CrIBo (docs/methods.md#cribo): ``config.py`` (the recipe's ``method`` section, light), ``ops.py``
(clustering, pooling and retrieval, pure functions), ``method.py`` (:class:`CrIBo`, its losses).
Names of the last two are imported on first use."""

from mlsctl.methods import forward_names
from mlsctl.methods.cribo.config import CrIBoConfig

__all__ = ["CrIBo", "CrIBoConfig"]
__getattr__ = forward_names(__name__, "method", "ops")
