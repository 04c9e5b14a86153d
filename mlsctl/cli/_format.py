"""Plain-text tables for the terminal, and progress lines on stderr."""

from __future__ import annotations

from typing import Sequence

from mlsctl.console import to_stderr


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[bool] | None = None) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    right = right or [i > 0 for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or value != value else f"{100 * value:.{digits}f}"


say = to_stderr  # a progress or status line on stderr (stdout stays the result's: tables, or --json)
