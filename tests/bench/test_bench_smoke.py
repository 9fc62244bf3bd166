"""Smoke test of ``python -m svdkernels bench --quick``: it runs, prints the rsvd
table with our row and the ``torch.svd_lowrank`` row, and writes valid JSON."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_quick_bench(tmp_path: Path) -> None:
    out = tmp_path / "results"
    # timeout: the quick bench is meant to take well under a minute.
    proc = subprocess.run(
        [sys.executable, "-m", "svdkernels", "bench", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    lines = proc.stdout.splitlines()
    assert "== rsvd ==" in lines, proc.stdout
    assert any("ours (svdkernels.rsvd)" in line for line in lines), proc.stdout
    assert any("torch.svd_lowrank" in line for line in lines), proc.stdout

    doc = json.loads((out / "bench.json").read_text())
    assert doc["machine"]["torch"] and doc["machine"]["threads"] >= 1
    rows = doc["families"]["rsvd"]
    for method in ("ours (svdkernels.rsvd)", "torch.svd_lowrank"):
        found = [r for r in rows if r["method"] == method]
        assert found, f"no {method} row in bench.json"
        for r in found:
            assert _finite(r["time_ms"]) and r["time_ms"] > 0, r
            assert _finite(r["vs_ours"]), r
            assert set(r["errors"]) == {"err/opt", "sv err", "orth"}, r
            assert all(_finite(v) for v in r["errors"].values()), r
            # Both are accurate at these settings: near the optimal rank-k error.
            assert 1 - 1e-6 <= r["errors"]["err/opt"] < 1.5, r
    assert any(r["kind"] == "roofline" and _finite(r["time_ms"]) for r in rows)
