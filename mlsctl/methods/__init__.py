"""The methods: one package each (``mlsctl/methods/<name>/``) holding its config (the recipe's
``method`` section, light), its :class:`~mlsctl.methods.base.Method` and its pure functions.
:mod:`mlsctl.registry` maps a recipe's ``method.name`` to them; these names re-export it."""

from __future__ import annotations

from mlsctl.registry import config_class, method_class, names

__all__ = ["config_class", "method_class", "names"]
