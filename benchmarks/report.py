"""Rebuild docs/benchmarks.md from the claims' result files docs/benchmarks/*.json.

Every benchmark script does it after writing its own result; run this by hand after editing a
result file or to regenerate the page.
"""

from __future__ import annotations

import argparse
import sys

from harness.report import PAGE, REPO, RESULTS_DIR, build_report

if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__).parse_args()
    path = build_report(RESULTS_DIR, PAGE)
    print(f"wrote {path.relative_to(REPO)}", file=sys.stderr)
