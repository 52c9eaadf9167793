"""Markdown tables for the benchmark scripts' printed figures, and the same rows as JSON (``--json``)."""

from __future__ import annotations

import json
from pathlib import Path


def format_table(rows: list[list], header: list[str], left_columns: int = 0) -> str:
    """A markdown table; the first ``left_columns`` columns are left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(r) -> str:
        cells = (str(c).ljust(w) if j < left_columns else str(c).rjust(w) for j, (c, w) in enumerate(zip(r, widths)))
        return "| " + " | ".join(cells) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def write_rows_json(path, header: list[str], rows: list[list], **meta) -> None:
    """The printed table's rows as a list of {column: cell}, plus ``meta`` (bench/quick_table.py reads it)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({**meta, "rows": [dict(zip(header, map(str, r))) for r in rows]}, indent=1))
