"""The one training loop, for every method (``mlsctl pretrain``), split by job:

* :mod:`~mlsctl.train.loop`: :func:`pretrain` and the steps, read top to bottom.

The names other modules use are offered here as well, imported on first use (``import
mlsctl.train`` stays light).
"""

from __future__ import annotations

import importlib

# name offered here → (module of this package, its name there)
_EXPORTS = {
    "pretrain": ("loop", "pretrain"),
    "RunSummary": ("loop", "RunSummary"),
    "RESUME_SAFE_KEYS": ("run_dir", "RESUME_SAFE_KEYS"),
    "TRACKER_MODULES": ("setup", "TRACKER_MODULES"),
    "param_groups": ("loop", "param_groups"),
    "build_optimizer": ("loop", "build_optimizer"),
    "ema_update": ("loop", "ema_update"),
    "save_checkpoint": ("loop", "save_checkpoint"),
    "load_checkpoint": ("loop", "load_checkpoint"),
    "log": ("setup", "log"),
    "progress_log": ("setup", "progress_log"),
    # private names that modules and tests of this repository import
    "_load_initial_weights": ("loop", "_load_initial_weights"),
    "_bank_health": ("loop", "_bank_health"),
    "_clip_gradients": ("loop", "_clip_gradients"),
    "_train": ("loop", "_train"),
}

__all__ = [name for name in _EXPORTS if not name.startswith("_")]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), attribute)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
