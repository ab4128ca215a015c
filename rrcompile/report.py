"""Plain-text tables and JSON reports."""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

from rrcompile.io import atomic_write


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None,
                 *, markdown: bool = False) -> str:
    """A fixed-width table; ``align`` has one 'l' or 'r' per column (default: first left, rest right).

    ``markdown`` gives a GitHub pipe table (same alignment), for pasting into a README.
    """
    align = align or "l" + "r" * (len(headers) - 1)
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def pad(row: list[str]) -> list[str]:
        return [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)]

    if markdown:
        rule = ["-" * (w - 1) + ":" if a == "r" else "-" * w for w, a in zip(widths, align)]
        return "\n".join("| " + " | ".join(r) + " |" for r in [pad(cells[0]), rule, *(pad(r) for r in cells[1:])])
    rule = "  ".join("-" * w for w in widths)
    return "\n".join(["  ".join(pad(cells[0])).rstrip(), rule, *("  ".join(pad(r)).rstrip() for r in cells[1:])])


def percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def write_json(data: Any, path: str | os.PathLike) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
