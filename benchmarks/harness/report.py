"""Rebuild ``docs/benchmarks.md`` from the claims' result files ``docs/benchmarks/*.json``.

Every benchmark script calls :func:`build_report` after writing its own result; run it by hand
after editing a result file or to regenerate the page: ``python benchmarks/report.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO / "docs" / "benchmarks"  # the claims' result files
PAGE = REPO / "docs" / "benchmarks.md"
INTRO = """\
# Benchmarks

Each claim has one script under `benchmarks/` that measures it and writes its section
below (`python benchmarks/<script>.py`; a script that measures its claim on several setups
writes one section per setup, chosen with `--variant`; `--quick` checks a script with tiny
settings without touching this page). The table is rebuilt from the sections' result
files in `docs/benchmarks/` by `python benchmarks/report.py`; no figure here is typed by hand.

The machine these ran on is shared: other jobs were running at the same time (each
section gives the load average at its start and end). That is why every claim is a
ratio or a difference between two things measured **in the same run**, alternated where
they are cheap enough to repeat; absolute times only describe that moment. This machine
has no GPU: every figure is CPU-only except claim 10, which ran on a GPU machine lent to
this project for a few minutes (its section names the GPU).
"""


def holds_text(value: bool | str | None) -> str:
    """yes / no / n/a, or the measurement's own words when it could not tell."""
    if isinstance(value, str):
        return value
    return {True: "yes", False: "**no**", None: "n/a (figure)"}[value]


def _machine(r: dict) -> str:
    m = r["machine"]
    start, end = r["load_start"], r["load_end"]
    other = "yes" if start[0] > 0.5 else "little or none"
    gpu = m.get("gpu") or "none"
    return (f"{m['platform']}; CPU {m['cpu']}, {m['cores']} cores; GPU {gpu}; Python {m['python']}, "
            f"torch {m['torch']}, ray {m['ray']}. Load average (1/5/15 min) at start {start[0]:.2f}/{start[1]:.2f}/"
            f"{start[2]:.2f}, at end {end[0]:.2f}/{end[1]:.2f}/{end[2]:.2f} — other load present: {other}.")


def render(results: list[dict]) -> str:
    lines = [INTRO, "## Claims", "", "| # | claim | goal | measured | holds |", "|---|---|---|---|---|"]
    for r in results:
        stale = f" **Stale:** {r['stale']}" if r.get("stale") else ""
        lines.append(f"| {r['number']} | [{r['title']}](#{r['number']}-{_anchor(r['title'])}) | {r['goal']} | "
                     f"{r['measured']}{stale} | {holds_text(r['holds'])} |")
    for r in results:
        lines += ["", f"## {r['number']}. {r['title']}", ""]
        if r.get("stale"):  # set by hand on a result whose code changed since it ran; a rerun drops it
            lines += [f"> **Stale:** {r['stale']}", ""]
        lines += [f"**Goal:** {r['goal']}  ", f"**Command:** `{r['command']}`  ",
                  f"**Date:** {r['date']} ({r['wall_s']:.0f} s)  ", f"**Machine:** {_machine(r)}", "",
                  f"**Result:** {r['measured']} — holds: {holds_text(r['holds'])}", "", r["details"].rstrip()]
    return "\n".join(lines).rstrip() + "\n"


def _anchor(title: str) -> str:
    keep = "".join(ch for ch in title.lower() if ch.isalnum() or ch in " -")
    return keep.replace(" ", "-")


def build_report(results_dir: Path, out: Path) -> Path:
    """Write ``out`` from every ``*.json`` in ``results_dir`` (ordered by claim number); returns ``out``."""
    results = sorted((json.loads(p.read_text()) for p in Path(results_dir).glob("*.json")),
                     key=lambda r: r["number"])
    out.write_text(render(results))
    return out

