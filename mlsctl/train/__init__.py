"""The one training loop, for every method (``mlsctl pretrain``), split by job:

* :mod:`~mlsctl.train.loop`: :func:`pretrain` and the steps, read top to bottom;
* :mod:`~mlsctl.train.setup`: Accelerate, logging, seeding, the recipe's checks;
* :mod:`~mlsctl.train.run_dir`: the run folder: its lock, the checks of ``--resume``, the undoing
  of a failed start;
* :mod:`~mlsctl.train.optim`: parameter groups, the optimiser, the schedules' values per step,
  clipping, EMA;
* :mod:`~mlsctl.train.checkpoint`: checkpoints saved and loaded, ``--init-from``, the teacher export;
* :mod:`~mlsctl.train.metrics`: metrics.jsonl, trackers, progress, the health of the banks.

It knows no method by name: what differs is declared by :class:`~mlsctl.methods.base.Method`.
The names other modules use are offered here as well, imported on first use (``import
mlsctl.train`` stays light). To replace one in a test, patch the module that defines it.
"""

from __future__ import annotations

import importlib

# name offered here → (module of this package, its name there)
_EXPORTS = {
    "pretrain": ("loop", "pretrain"),
    "RunSummary": ("loop", "RunSummary"),
    "RESUME_SAFE_KEYS": ("run_dir", "RESUME_SAFE_KEYS"),
    "TRACKER_MODULES": ("setup", "TRACKER_MODULES"),
    "param_groups": ("optim", "param_groups"),
    "build_optimizer": ("optim", "build_optimizer"),
    "ema_update": ("optim", "ema_update"),
    "save_checkpoint": ("checkpoint", "save_checkpoint"),
    "load_checkpoint": ("checkpoint", "load_checkpoint"),
    "log": ("setup", "log"),
    "progress_log": ("setup", "progress_log"),
    # the name it had in mlsctl/train.py, which a test imports
    "_bank_health": ("metrics", "bank_health"),
}

__all__ = [name for name in _EXPORTS if not name.startswith("_")]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), attribute)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
