"""Registry of methods. Each method module defines a :class:`~mlsctl.methods.base.Method`
subclass with a ``Config`` dataclass; the recipe's ``method.name`` picks it."""

from __future__ import annotations

import importlib

_METHODS = {
    "dino": "mlsctl.methods.dino:DINO",
    "cribo": "mlsctl.methods.cribo:CrIBo",
    "mile": "mlsctl.methods.mile:MILE",
    "sove": "mlsctl.methods.sove:SOVE",
    "mls": "mlsctl.methods.mls:MLS",
    "ms": "mlsctl.methods.ms:MS",
    "refine": "mlsctl.methods.refine:Refine",
}


def names() -> list[str]:
    return list(_METHODS)


def method_class(name: str):
    module, _, attr = _METHODS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def config_class(name: str):
    return method_class(name).Config
