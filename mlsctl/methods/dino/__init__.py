"""DINO (docs/methods.md#dino): ``config.py`` (the recipe's ``method`` section, light) and
``method.py`` (:class:`DINO`, imported on first use). Its loss, center and student/teacher networks
are shared with CrIBo, MILE and SOVE, so they live in :mod:`mlsctl.methods.self_distillation`."""

from mlsctl.methods import forward_names
from mlsctl.methods.dino.config import DINOConfig

__all__ = ["DINO", "DINOConfig"]
__getattr__ = forward_names(__name__, "method")
