"""The result files of the evaluations: one JSON object each, ``results/<evaluation>-<time>.json``
unless named, stamped (``written``: date, mlsctl version, commit). ``mlsctl report`` finds a run's
results among them by the ``model`` fingerprint they record (docs/report.md), so a script that
calls an evaluation function and writes its result here gets the same treatment as the CLI's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional


def default_path(evaluation: str) -> Path:
    """``results/<evaluation>-<YYYYmmdd-HHMMSS>.json``, relative to the working directory."""
    return Path("results") / f"{evaluation}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def write_result(payload: dict, out: Optional[Path], evaluation: str) -> Path:
    """Stamp ``payload`` (``written``) and write it atomically to ``out`` (or :func:`default_path`);
    returns the path written."""
    from mlsctl import atomic, provenance

    path = Path(out) if out is not None else default_path(evaluation)
    payload["written"] = provenance.stamp()
    atomic.write_json(path, payload)
    return path
