"""What a benchmark script measures: a :class:`Claim` of docs/benchmarks.md, and the :class:`Variant`
of a script that measures one claim on several setups (its settings as data, chosen with ``--variant``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Claim:
    """One claim of docs/benchmarks.md: its place in the table and what would make it hold."""

    number: int
    key: str    # file name of its result, e.g. "spaces_compare"
    title: str
    goal: str


@dataclass(frozen=True)
class Variant:
    """One setup a script measures its claim on: the section it writes (``claim``: its number, its result
    file ``docs/benchmarks/<claim.key>.json``), the settings of a real run and the tiny ones of ``--quick``.
    ``needs``: a file the run cannot do without (``missing`` tells how to make it), checked before it starts."""

    claim: Claim
    settings: dict[str, Any]
    quick: dict[str, Any]
    needs: Path | None = None
    missing: str = ""
