"""The result files of the evaluations: one JSON object each, ``results/<evaluation>-<time>.json``
unless named, stamped (``written``: date, mlsctl version, commit). ``mlsctl report`` finds a run's
results among them by the ``model`` fingerprint they record (docs/report.md), so a script that
calls an evaluation function and writes its result here gets the same treatment as the CLI's.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional


def default_path(evaluation: str) -> Path:
    """``results/<evaluation>-<YYYYmmdd-HHMMSS>-<process id>.json``, relative to the working directory:
    two evaluations ending in the same second (a sweep's jobs) wrote one file, and the first one's
    results were lost (a probe, 2026-12-06)."""
    return Path("results") / f"{evaluation}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"


def write_result(payload: dict, out: Optional[Path], evaluation: str) -> Path:
    """Stamp ``payload`` (``written``) and write it atomically to ``out`` (or :func:`default_path`);
    returns the path written."""
    from mlsctl import atomic, provenance

    from mlsctl.outputs import check_results_target

    path = Path(out) if out is not None else default_path(evaluation)
    # checked again now the work is done: the command may have made the file since (a cache manifest of its own)
    check_results_target(path)
    payload["written"] = provenance.stamp()
    atomic.write_json(path, payload)
    return path
