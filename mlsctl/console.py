"""Where status lines go: stderr, so that stdout holds only a command's result (its table, or its
``--json``) and a library call's progress never mixes into what a script prints."""

from __future__ import annotations

import sys


def to_stderr(line: str) -> None:
    """One status line on stderr, flushed (the default ``say`` of the library's long calls)."""
    print(line, file=sys.stderr, flush=True)
