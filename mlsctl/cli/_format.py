"""Plain-text tables for the terminal, and progress lines on stderr."""

from __future__ import annotations

from typing import Sequence

from mlsctl.console import percent, to_stderr


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[bool] | None = None) -> str:
    """Columns aligned by the terminal width of their text (:func:`display_width`), first column to the
    left and the others to the right unless ``right`` says otherwise."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(display_width(r[i]) for r in cells) for i in range(len(headers))]
    right = right or [i > 0 for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        padded = (" " * (w - display_width(c)) + c if r else c + " " * (w - display_width(c))
                  for c, w, r in zip(row, widths, right))
        lines.append("  ".join(padded).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def display_width(text: str) -> int:
    """Columns ``text`` takes in a terminal: two for a wide character (日本), none for a combining mark
    (the accent of a decomposed é); a table of ids in Japanese was out of line (a new user's probe,
    2026-12-07)."""
    import unicodedata

    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def pct(value: float | None, digits: int = 1) -> str:
    return percent(value, digits)


say = to_stderr  # a progress or status line on stderr (stdout stays the result's: tables, or --json)
