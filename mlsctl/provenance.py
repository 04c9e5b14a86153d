"""What made a file: the date, the mlsctl version and its git commit, the device.

Run summaries, checkpoints and eval results record these so that a report can say when, with which
code and on what a number was made. The commit is that of the source tree mlsctl runs from, when it
is a git checkout (``None`` for an installed copy, or where git is missing); ``-dirty`` is appended
when tracked files differ from it.
"""

from __future__ import annotations

import datetime
import functools
import os
import subprocess
from pathlib import Path
from typing import Optional


COMMIT_VARIABLE = "MLSCTL_COMMIT"  # set by the device scripts: a copy's .git may be stale (scripts/device_prepare.sh)


def commit() -> Optional[str]:
    """The git commit of mlsctl's source tree (``"<sha>"`` or ``"<sha>-dirty"``), or None; the environment's
    ``MLSCTL_COMMIT`` when set (a copy of the tree on a device, whose git metadata may be another commit's)."""
    return os.environ.get(COMMIT_VARIABLE) or _git_commit()


@functools.lru_cache(maxsize=None)
def _git_commit() -> Optional[str]:
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():  # an installed copy: site-packages is no checkout of mlsctl
        return None

    def git(*args: str) -> Optional[str]:
        try:
            # --no-optional-locks: `git status` would take .git/index.lock, and a developer's own git command at
            # that moment fail (a new user, 2026-12-06)
            done = subprocess.run(["git", "--no-optional-locks", "-C", str(root), *args], capture_output=True,
                                  text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    if not sha:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return sha + ("-dirty" if status else "")


def now() -> str:
    """The local time with its UTC offset, to the second (ISO 8601)."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def device_name(device) -> str:
    """``cuda:0 (NVIDIA H200)``, ``cpu``, ``mps``: the device and, for a GPU, its model."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def stamp() -> dict:
    """What an output file records about its making: date, mlsctl version, commit."""
    from mlsctl import __version__

    return {"date": now(), "mlsctl_version": __version__, "commit": commit()}
