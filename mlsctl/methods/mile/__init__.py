"""MILE (docs/methods.md#mile): ``config.py`` (the recipe's ``method`` section, light),
``method.py`` (:class:`MILE`, its set encoder and head), ``set_model.py`` (a trained teacher as a set model:
backbone + set encoder and the fold of images into a set's latent; galleries add the photo side in
:mod:`mlsctl.gallery`). Names of ``method.py`` are imported on first use."""

from mlsctl.methods import forward_names
from mlsctl.methods.mile.config import MILEConfig

__all__ = ["MILE", "MILEConfig"]
__getattr__ = forward_names(__name__, "method")
