"""Smoke test of ``python -m svdkernels bench --quick``: it runs once, prints each
family's table with our row and the peers' rows, and writes valid JSON."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[list[str], dict]:
    out = tmp_path_factory.mktemp("bench") / "results"
    # timeout: the quick bench is meant to take well under a minute.
    proc = subprocess.run(
        [sys.executable, "-m", "svdkernels", "bench", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.splitlines(), json.loads((out / "bench.json").read_text())


def test_quick_bench_rsvd(quick_run) -> None:
    lines, doc = quick_run
    proc_stdout = "\n".join(lines)
    assert "== rsvd ==" in lines, proc_stdout
    assert any("ours (svdkernels.rsvd)" in line for line in lines), proc_stdout
    assert any("torch.svd_lowrank" in line for line in lines), proc_stdout

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


def test_quick_bench_kron_linear(quick_run) -> None:
    lines, doc = quick_run
    assert "== kron_linear ==" in lines
    rows = doc["families"]["kron_linear"]
    for method in ("ours (KronLinear)", "peft LoKr", "frozen base F.linear"):
        found = [r for r in rows if r["method"] == method]
        assert len(found) == 2, (method, found)  # forward, forward+backward
        assert all(_finite(r["time_ms"]) and r["time_ms"] > 0 for r in found)
    for r in rows:
        if r["method"] in ("ours (KronLinear)", "peft LoKr"):
            assert r["errors"]["err"] < 1e-5, r  # both compute the same adapter in fp32
    assert sum(r["kind"] == "roofline" for r in rows) == 2


def test_quick_bench_lowrank_quant(quick_run) -> None:
    lines, doc = quick_run
    assert "== lowrank_quant ==" in lines
    rows = doc["families"]["lowrank_quant"]
    for method in ("ours (lowrank_w4a16_linear)", "F.linear fp32", "_weight_int4pack_mm_for_cpu"):
        found = [r for r in rows if r["method"] == method]
        assert found, method
        for r in found:
            assert _finite(r["time_ms"]) and r["time_ms"] > 0, r
            # bf16 outputs round at 2^-8; fp32 ones agree with float64 to ~1e-6.
            assert r["errors"]["rel err"] < 5e-3, r
    gpu = [r for r in rows if r["method"] == "roofline H100 (GPU estimate)"]
    assert gpu and all(r["extra"]["dense_bf16_bytes"] > r["extra"]["bytes"] for r in gpu)
