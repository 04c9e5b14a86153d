"""The methods a recipe's ``method.name`` picks, by name: where each one's code lives.

Every entry is two lazy ``"module:attribute"`` strings: the method (its
:class:`~mlsctl.methods.base.Method`, which imports torch and the models) and, separately, its
config class (the recipe's ``method`` section, a dataclass that imports only the schema helpers of
:mod:`mlsctl.config`). Reading a recipe loads the config class alone, so typing a recipe
(``mlsctl.config.load_recipe``, ``Run.is_run``) never imports a method's stack; building a
method for training or for reading a run loads the method.

This module imports nothing of mlsctl but :mod:`mlsctl.errors` (both are standard library only): it
sits at the bottom of the layers, below :mod:`mlsctl.config`, which reads it. A new method is one entry here and one package
in ``mlsctl/methods/``.
"""

from __future__ import annotations

import difflib
import importlib
from typing import NamedTuple

from mlsctl.errors import UserError


class Entry(NamedTuple):
    method: str  # "module:Class" of the Method
    config: str  # "module:Class" of its config dataclass (light: no torch)


# in the order `mlsctl recipes`, the README and the error messages list them
METHODS: dict[str, Entry] = {
    "dino": Entry("mlsctl.methods.dino.method:DINO", "mlsctl.methods.dino.config:DINOConfig"),
    "cribo": Entry("mlsctl.methods.cribo.method:CrIBo", "mlsctl.methods.cribo.config:CrIBoConfig"),
    "mile": Entry("mlsctl.methods.mile.method:MILE", "mlsctl.methods.mile.config:MILEConfig"),
    "sove": Entry("mlsctl.methods.sove.method:SOVE", "mlsctl.methods.sove.config:SOVEConfig"),
    "mls": Entry("mlsctl.methods.mls.method:MLS", "mlsctl.methods.mls.config:MLSConfig"),
    "ms": Entry("mlsctl.methods.ms.method:MS", "mlsctl.methods.ms.config:MSConfig"),
    "refine": Entry("mlsctl.methods.refine.method:Refine", "mlsctl.methods.refine.config:RefineConfig"),
}


def names() -> list[str]:
    """The method names, in registry order."""
    return list(METHODS)


def load(spec: str):
    """The object a ``"module:attribute"`` string names (importing its module)."""
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def entry(name: str) -> Entry:
    """The registry entry of ``name``; an unknown name is one sentence listing the methods."""
    if name not in METHODS:
        close = difflib.get_close_matches(str(name), METHODS, n=1)
        raise UserError(f"no method is named {name!r}; the methods are {', '.join(METHODS)}"
                        + (f" (did you mean {close[0]}?)" if close else ""))
    return METHODS[name]


def method_class(name: str) -> type:
    """The :class:`~mlsctl.methods.base.Method` subclass of ``name`` (imports its stack)."""
    return load(entry(name).method)


def config_class(name: str) -> type:
    """The config dataclass of ``name`` (the recipe's ``method`` section), without its method."""
    return load(entry(name).config)
