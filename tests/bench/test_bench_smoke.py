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
    # timeout: a hang guard, not a speed check (the quick run of every family takes
    # about a minute and a half on 2 quiet cores).
    proc = subprocess.run(
        [sys.executable, "-m", "svdkernels", "bench", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "bench.png").exists(), "bench.png missing: matplotlib is part of the bench set-up"
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, "bench.png is not a real picture"
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


def test_quick_bench_lowrank_attention(quick_run) -> None:
    lines, doc = quick_run
    assert "== lowrank_attention ==" in lines
    rows = doc["families"]["lowrank_attention"]
    timed = {"ours absorbed": 1e-5, "ours pre-RoPE": 1e-5, "dense SDPA fp32": 1e-5,
             "ours absorbed, bf16 cache": 2e-2}  # fp32 against float64; bf16 includes the cache's rounding
    for method, tol in timed.items():
        found = [r for r in rows if r["method"] == method]
        assert found, method
        for r in found:
            assert _finite(r["time_ms"]) and r["time_ms"] > 0 and _finite(r["vs_ours"]), r
            assert r["errors"]["rel err"] < tol, r
    for r in rows:
        if r["method"].startswith("ours absorbed"):
            # fp32 latents: exactly 4x per token, the bases cost the rest; bf16 halves it again.
            assert r["extra"]["dense_cache_bytes"] > 2 * r["extra"]["cache_bytes"], r
    gpu = [r for r in rows if r["method"].startswith("roofline H100")]
    assert len(gpu) == 2 and all(r["extra"]["dense_bytes"] > 2 * r["extra"]["bytes"] for r in gpu)
    assert {r["method"] for r in rows if r["method"].startswith("roofline ") and "H100" not in r["method"]} == {
        "roofline absorbed (hw limit)", "roofline pre-RoPE (hw limit)"}
    minilm = [r for r in rows if r["workload"].startswith("MiniLM")]
    assert {r["extra"]["group_size"] for r in minilm} == {1, 2, 3}
    assert all(1 - 1e-6 <= r["errors"]["key/EY"] < 1.05 for r in minilm)


def test_quick_bench_adapters(quick_run) -> None:
    lines, doc = quick_run
    assert "== adapters ==" in lines
    rows = doc["families"]["adapters"]
    init = [r for r in rows if r["workload"].startswith("init")]
    assert {r["method"] for r in init} == {"ours (adapt pissa, batched rsvd)", "peft pissa_niter_4",
                                           "peft pissa (full SVD)"}
    for r in init:  # rank-16 error over Eckart-Young's optimum: 1 is exact
        assert _finite(r["time_ms"]) and 1 - 1e-4 <= r["errors"]["ratio"] < 1.1, r
    steps = [r for r in rows if r["workload"].startswith("fwd+bwd")]
    assert {"ours pissa", "ours salt", "peft LoRA", "frozen F.linear"} <= {r["method"] for r in steps}
    for r in steps:
        assert _finite(r["time_ms"]) and r["time_ms"] > 0, r
        if r["method"] != "frozen F.linear":
            assert r["errors"]["err"] < 1e-4, r  # fp32 thin products against float64 on the dense weight


def test_quick_bench_quantize_model(quick_run) -> None:
    lines, doc = quick_run
    assert "== quantize_model ==" in lines
    rows = {r["method"]: r for r in doc["families"]["quantize_model"]}
    ours, naive4, naive16 = rows["SVDQuant W4A4 r32"], rows["naive W4A4 (RTN)"], rows["naive W4A16 (RTN)"]
    for r in (ours, naive4, naive16):
        assert _finite(r["time_ms"]) and r["time_ms"] > 0, r
        assert set(r["errors"]) == {"avg SQNR dB", "cos mean", "cos min"}, r
        assert all(_finite(v) for v in r["errors"].values()), r
        assert len(r["extra"]["per_layer_sqnr_db"]) == 37, r
        assert r["extra"]["weight_bytes"] < r["extra"]["bf16_bytes"] < r["extra"]["fp32_bytes"], r
    # issue 4's real-weights target, also asserted in tests/quant/test_minilm_quant.py
    assert ours["errors"]["avg SQNR dB"] >= naive4["errors"]["avg SQNR dB"] + 5
    assert ours["errors"]["avg SQNR dB"] >= naive16["errors"]["avg SQNR dB"]
    assert ours["errors"]["cos min"] > 0.95


def test_every_family_reports_our_rows(quick_run) -> None:
    # Every registered family (the newer ones included: optim, compress, analysis)
    # prints its table and times at least one of our rows, with accuracy beside it.
    from svdkernels.bench import load_families

    lines, doc = quick_run
    for name in load_families():
        assert f"== {name} ==" in lines, name
        ours = [r for r in doc["families"][name] if r["kind"] == "ours"]
        assert ours, f"{name}: no ours row"
        assert any(_finite(r["time_ms"]) and r["time_ms"] > 0 for r in ours), (name, ours)
        assert all(r["errors"] for r in ours if r["time_ms"] is not None), (name, ours)


def test_family_pictures(quick_run) -> None:
    # compress and optim draw their own pictures next to bench.png.
    out = Path(quick_run[1]["settings"]["out"])
    for name in ("compress", "optim"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name
