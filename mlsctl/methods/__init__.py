"""The methods: one package each (``mlsctl/methods/<name>/``) holding its config (the recipe's
``method`` section, light), its :class:`~mlsctl.methods.base.Method` and its pure functions.
:mod:`mlsctl.registry` maps a recipe's ``method.name`` to them; these names re-export it."""

from __future__ import annotations

from mlsctl.registry import config_class, method_class, names

__all__ = ["config_class", "method_class", "names"]


def forward_names(package: str, *modules: str):
    """A method package's module ``__getattr__``: a name the package does not define comes from
    the first of its ``modules`` (``"method"``, ``"ops"``) that has it, imported on first use, so
    ``from mlsctl.methods.dino import DINO`` keeps working while ``mlsctl.methods.dino.config``
    imports no torch."""
    import importlib

    def __getattr__(name: str):
        if not name.startswith("__"):
            for module in modules:
                found = importlib.import_module(f"{package}.{module}")
                if hasattr(found, name):
                    return getattr(found, name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
