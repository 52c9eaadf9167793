"""Markdown tables for the benchmark scripts' printed figures."""

from __future__ import annotations


def format_table(rows: list[list], header: list[str], left_columns: int = 0) -> str:
    """A markdown table; the first ``left_columns`` columns are left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(r) -> str:
        cells = (str(c).ljust(w) if j < left_columns else str(c).rjust(w) for j, (c, w) in enumerate(zip(r, widths)))
        return "| " + " | ".join(cells) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])
