"""The fuzz suite's report: how many cases ran per entry point (issue 12's closing note)."""
from __future__ import annotations

import json
import os

import pytest

from fuzz_support import COUNTS, RESULTS  # tests/fuzz is on sys.path (pytest's rootdir-relative "prepend" import)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not COUNTS:
        return
    terminalreporter.section("fuzz cases per entry point")
    terminalreporter.write_line(f"{'entry point':45s} {'cases':>5s} {'results':>7s} {'named errors':>12s}")
    for name, n in sorted(COUNTS.items()):
        terminalreporter.write_line(f"{name:45s} {n:5d} {RESULTS[name]:7d} {n - RESULTS[name]:12d}")
    total, ok = sum(COUNTS.values()), sum(RESULTS.values())
    terminalreporter.write_line(f"{'total':45s} {total:5d} {ok:7d} {total - ok:12d}")
    out = os.environ.get("SVDKERNELS_FUZZ_COUNTS")
    if out:  # a JSON copy for the closing note
        with open(out, "w") as f:
            json.dump({k: {"cases": n, "results": RESULTS[k]} for k, n in sorted(COUNTS.items())}, f, indent=1)
