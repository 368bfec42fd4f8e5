"""Markdown tables of benchmark rows: one module below ``common`` and ``rows``, which both print them."""

from __future__ import annotations

import math
from typing import Any, Sequence


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def md_table(rows: Sequence[dict[str, Any]], digits: int = 2) -> str:
    """Markdown table of dict rows (keys are the headers; floats with ``digits`` decimals)."""
    if not rows:
        return "(no rows)"
    heads = list(rows[0])
    cell = lambda v: fmt(v, digits) if isinstance(v, float) or v is None else str(v)  # noqa: E731
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    lines += ["| " + " | ".join(cell(r[h]) for h in heads) + " |" for r in rows]
    return "\n".join(lines)
