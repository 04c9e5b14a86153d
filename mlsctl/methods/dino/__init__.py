"""DINO (docs/methods.md#dino): ``config.py`` (the recipe's ``method`` section, light), ``ops.py``
(the loss and the center, pure functions), ``method.py`` (:class:`DINO`, the student/teacher
networks other methods build on). Names of the last two are imported on first use."""

from mlsctl.methods import forward_names
from mlsctl.methods.dino.config import DINOConfig

__all__ = ["DINO", "DINOConfig"]
__getattr__ = forward_names(__name__, "method", "ops")
