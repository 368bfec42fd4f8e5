"""Results written as they are measured, so that a benchmark stopped part-way keeps what it finished.

A benchmark on a lent GPU machine runs under a time limit (``timeout`` in ``benchmarks/gpu_check.sh``):
if it is stopped before it returns, its record (``docs/benchmarks/<claim>.json``, written at the end by
:func:`harness.common.main`) never appears. Two helpers keep the work done so far on disk instead:

- :class:`RowLog`: ``<claim>.partial.jsonl``, a header line (claim, command, machine, settings, start)
  and then one line per measured row, each flushed to disk the moment it is added. ``main`` opens one for
  every claim (``ctx.log``); a script calls ``ctx.add_row(table, row)`` as each row is measured. When the
  record is written the file is removed (the record holds every row); a run that was stopped leaves it.
- :class:`GrowingPage`: a markdown page rewritten after each section (``profile_steps.py``).

:class:`TimeLimit` is what ``main`` raises when the process gets SIGTERM (``timeout`` sends it at the
limit): a script may catch it around a phase it can do without and still write its record.

Read a partial file back with :func:`read_rows`, or as markdown tables from the command line::

    python benchmarks/harness/rows.py results/gpu_check/benchmarks/training_speed.partial.jsonl
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterable

PARTIAL_SUFFIX = ".partial.jsonl"  # not *.json: harness.report never reads one as a record


class TimeLimit(BaseException):
    """SIGTERM arrived (the time limit of ``timeout``): a BaseException, so ``except Exception`` lets it by."""


def raise_on_sigterm() -> None:
    """From now on SIGTERM raises :class:`TimeLimit` in the main thread (instead of ending the process
    at once), so the code that runs can save what it has."""

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process
        raise TimeLimit(f"signal {signum} (time limit)")

    signal.signal(signal.SIGTERM, handler)


def partial_path(directory: Path, key: str) -> Path:
    return Path(directory) / f"{key}{PARTIAL_SUFFIX}"


def _plain(value: Any) -> Any:
    """JSON-able copy of a row (numpy scalars and arrays, tuples, paths)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalar or array, torch tensor
        return _plain(value.tolist())
    if isinstance(value, float) and value != value:  # NaN
        return None
    if isinstance(value, Path):
        return str(value)
    return value


class RowLog:
    """One JSON line per measured row, appended, flushed and fsynced at once (see the module's text).

    ``header``: what the rows belong to (claim, command, machine, settings…), the file's first line.
    Opening a log truncates an earlier file of the same path: a new run starts a new log."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = 0
        self._write({"header": _plain(header), "started": time.time()}, mode="w")

    def add(self, table: str, row: dict[str, Any]) -> None:
        """Row ``row`` of table ``table`` (a script may keep several tables), on disk when this returns."""
        self.rows += 1
        self._write({"table": table, "row": _plain(row), "t": round(time.time(), 3)})

    def note(self, text: str) -> None:
        """A line of text for whoever reads a partial file (what was skipped, and why)."""
        self._write({"note": text, "t": round(time.time(), 3)})

    def _write(self, entry: dict[str, Any], mode: str = "a") -> None:
        with open(self.path, mode) as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def finish(self) -> None:
        """The record is written and holds every row: the partial file goes."""
        self.path.unlink(missing_ok=True)


def read_rows(path: Path) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]], list[str]]:
    """(header, rows by table in the order measured, notes) of a partial file. A last line cut off by a
    kill is skipped."""
    header: dict[str, Any] = {}
    tables: dict[str, list[dict[str, Any]]] = {}
    notes: list[str] = []
    for line in Path(path).read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "header" in entry:
            header = entry["header"]
        elif "table" in entry:
            tables.setdefault(entry["table"], []).append(entry["row"])
        elif "note" in entry:
            notes.append(entry["note"])
    return header, tables, notes


class GrowingPage:
    """A markdown page written again after every section added, so a stopped run keeps the sections done."""

    def __init__(self, path: Path, lines: Iterable[str] = ()) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lines: list[str] = []
        self.add(lines)

    def add(self, lines: Iterable[str]) -> None:
        self.lines += list(lines)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("\n".join(self.lines) + "\n")
        os.replace(tmp, self.path)

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def summary(path: Path) -> str:
    """Markdown of a partial file: what it belongs to, its notes and its rows as tables."""
    from harness.tables import md_table

    header, tables, notes = read_rows(path)
    lines = [f"# {path.name}: rows measured before the run stopped", "",
             f"Claim {header.get('number')} ({header.get('key')}), started {header.get('date')}, "
             f"command `{header.get('command')}`.", ""]
    lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    for table, rows in tables.items():
        heads = list(dict.fromkeys(k for r in rows for k in r))  # a row measured later may add columns
        lines += [f"## {table}", "", md_table([{h: r.get(h) for h in heads} for r in rows], 3), ""]
    if not tables:
        lines.append("(no row was finished)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for `import harness`
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[-1].strip())
        sys.exit(0 if len(sys.argv) > 1 else 2)
    for name in sys.argv[1:]:
        print(summary(Path(name)))
