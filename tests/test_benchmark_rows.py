"""The benchmark harness writes rows as they are measured (benchmarks/harness/rows.py), so a benchmark
stopped by its time limit (benchmarks/gpu_check.sh) keeps the rows it finished."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from harness.rows import GrowingPage, RowLog, partial_path, read_rows, summary  # noqa: E402


def test_rows_are_on_disk_as_soon_as_added_and_go_with_the_record(tmp_path):
    path = partial_path(tmp_path, "claim")
    log = RowLog(path, {"number": 1, "key": "claim", "settings": {"grid": (32, 128)}})
    log.add("grid", {"px": 32, "img/s": 1.5})
    header, tables, notes = read_rows(path)  # read while the log is open, as after a kill
    assert header["settings"] == {"grid": [32, 128]}
    assert tables == {"grid": [{"px": 32, "img/s": 1.5}]}
    log.add("grid", {"px": 32, "img/s": float("nan"), "extra": 2})
    log.note("static step skipped")
    with open(path, "a") as f:  # a line cut off by SIGKILL is skipped
        f.write('{"table": "grid", "row": {"px"')
    header, tables, notes = read_rows(path)
    assert tables["grid"][1] == {"px": 32, "img/s": None, "extra": 2}
    assert notes == ["static step skipped"]
    text = summary(path)
    assert "static step skipped" in text and "| px | img/s | extra |" in text
    assert not path.name.endswith(".json")  # harness.report reads *.json as records: never a partial file
    log.finish()
    assert not path.exists()


def test_growing_page_holds_each_section_once_added(tmp_path):
    page = GrowingPage(tmp_path / "cpu.md", ["# Profile", ""])
    assert (tmp_path / "cpu.md").read_text() == "# Profile\n\n"
    page.add(["## one", "text"])
    assert (tmp_path / "cpu.md").read_text() == "# Profile\n\n## one\ntext\n"


BENCHMARK = """
import sys, time
sys.path.insert(0, {bench!r})
from harness.claims import Claim
from harness.common import Outcome, main
from harness.rows import TimeLimit

def measure(ctx, rows, catch):
    for i in range(rows):
        ctx.add_row("grid", {{"i": i}})
    try:
        time.sleep(120)  # the slow phase, stopped by SIGTERM
    except TimeLimit:
        if not catch:
            raise
        ctx.log.note("slow phase stopped")
    return Outcome("{{}} rows".format(rows), None, {{"rows": rows}}, "details")

sys.exit(main(Claim(99, "test_rows_harness", "harness rows", "none"), measure, {{"rows": 2}}, {{"rows": 2}},
              flags={{"catch": "catch the time limit and write the record"}}))
"""


def _run_until_rows(tmp_path: Path, *flags: str) -> tuple[int, Path]:
    """The little benchmark above run with ``flags`` and SIGTERM sent once its rows are on disk:
    (exit status, its docs folder)."""
    script = tmp_path / "bench.py"
    script.write_text(textwrap.dedent(BENCHMARK.format(bench=str(REPO / "benchmarks"))))
    docs = tmp_path / "docs"
    proc = subprocess.Popen([sys.executable, str(script), "--quick", "--docs-dir", str(docs), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    partial = partial_path(docs, "test_rows_harness")
    deadline = time.monotonic() + 120  # a bound on waiting for a start-up on a busy machine, not a timing check
    while time.monotonic() < deadline and proc.poll() is None:
        if partial.exists() and len(read_rows(partial)[1].get("grid", [])) == 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    print(out)
    return proc.returncode, docs


@pytest.mark.parametrize("catch", [False, True])
def test_a_benchmark_stopped_by_sigterm_keeps_its_rows(tmp_path, catch):
    status, docs = _run_until_rows(tmp_path, *(["--catch"] if catch else []))
    partial = partial_path(docs, "test_rows_harness")
    record = docs / "test_rows_harness.json"
    if catch:  # the script saved what it had: a record, and no partial file left
        assert status == 0
        assert json.loads(record.read_text())["settings"] == {"rows": 2, "catch": True}
        assert not partial.exists()
    else:  # no record; the rows measured stay in the partial file
        assert status == 124
        assert not record.exists()
        header, tables, _ = read_rows(partial)
        assert header["key"] == "test_rows_harness" and header["settings"] == {"rows": 2, "catch": False}
        assert tables["grid"] == [{"i": 0}, {"i": 1}]
