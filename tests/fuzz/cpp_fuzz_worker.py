"""Run in a subprocess by test_fuzz_cpp.py: fuzz the C++ W4A16 kernel and the W4A4
pair (svdkernels._C).

A crash (segfault, abort, an OpenMP or ISA fault) kills this process, not the test
run; the parent then fails with the exit status. Writes ``{"counts", "results",
"failures"}`` as JSON to the path in ``argv[1]``.
"""
from __future__ import annotations

import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import svdkernels  # noqa: E402
import svdkernels._C  # noqa: E402,F401 - registers the C++ ops
import svdkernels.reference.lowrank_quant  # noqa: E402,F401
from fuzz_support import COUNTS, FLOAT_DTYPES, RESULTS, fuzz, run_case, values  # noqa: E402
from svdkernels.quant import quantize_weight  # noqa: E402

torch.set_num_threads(1)
ARGS = ["x", "qweight", "scales", "L_down", "L_up", "bias", "isa", "K"]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@st.composite
def operands(draw, consistent: bool):
    bad = None if consistent else draw(st.sampled_from(["K", "N", "r", "dtype", "qdtype", "noncontig", "bias",
                                                        "dim", "isa", "empty-N"]))
    M, N = draw(st.integers(0, 17)), draw(st.integers(1, 40))
    K = 64 * draw(st.integers(1, 3))
    r = 16 * draw(st.integers(0, 2))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    # float16 tops out at 65504: weights or inputs of 1e3 over K = 192 would overflow
    # the exact result itself (a weight of 1e3 did: 8.0e4 from one group of 64).
    mags = (1.0, 1e-3) if dtype == torch.float16 else (1.0, 1e-3, 1e3)
    W, _ = draw(values((N, K), torch.float32, special=False, magnitudes=mags))
    qw, s = quantize_weight(W, dtype=dtype)
    x, finite = draw(values((M, K), dtype, special=draw(st.integers(0, 5)) == 0, magnitudes=mags))
    Ld, Lu = torch.randn(r, K, dtype=dtype) / 8, torch.randn(N, r, dtype=dtype) / 8
    bias = torch.randn(N, dtype=dtype) if draw(st.booleans()) else None
    isa = draw(st.integers(-1, torch.ops.svdkernels._cpp_best_isa()))
    if bad == "K":
        x = x[:, :-1]
    if bad == "N":
        Lu = Lu[:-1]
    if bad == "r":
        Ld, Lu = Ld[:8], Lu[:, :8]
    if bad == "dtype":
        s = s.to(torch.float32 if dtype != torch.float32 else torch.bfloat16)
    if bad == "qdtype":
        qw = qw.to(torch.int16)
    if bad == "noncontig":
        qw = torch.cat([qw, qw], 1)[:, : qw.shape[1]]
    if bad == "bias":
        bias = torch.randn(N + 1, dtype=dtype)
    if bad == "dim":
        x = x[None]
    if bad == "isa":
        isa = draw(st.sampled_from([-2, 4, 99]))
    if bad == "empty-N":
        qw, s, Lu = qw[:0], s[:0], Lu[:0]
        bias = None
    return x, qw, s, Ld, Lu, bias, isa, finite and bad is None


@fuzz(60)
@given(operands(True), st.booleans())
def public_op_matches_reference(case, strided):
    """``lowrank_w4a16_linear`` on the cpp backend, any strides of x, against the reference backend."""
    x, qw, s, Ld, Lu, bias, _, finite = case
    if strided and x.shape[0] > 1:
        x = x[::2]  # rows with a stride
    with svdkernels.use_backend("cpp"):
        out = run_case("lowrank_w4a16_linear [cpp]",
                       lambda: svdkernels.lowrank_w4a16_linear(x, qw, s, L_down=Ld, L_up=Lu, bias=bias), ARGS,
                       finite_input=finite)
    if not out.ok or not finite:
        return
    with svdkernels.use_backend("reference"):
        want = svdkernels.lowrank_w4a16_linear(x, qw, s, L_down=Ld, L_up=Lu, bias=bias)
    err = float((out.value.float() - want.float()).abs().max()) if want.numel() else 0.0
    assert err <= TOL[x.dtype] * (float(want.float().abs().max()) + 1 if want.numel() else 1), err


@fuzz(60)
@given(operands(False))
def internal_op_validates(case):
    """``torch.ops.svdkernels._cpp_lowrank_w4a16_linear`` called directly (no Python
    validation in front): every inconsistency is a named ValueError/TypeError."""
    x, qw, s, Ld, Lu, bias, isa, finite = case
    run_case("torch.ops.svdkernels._cpp_lowrank_w4a16_linear",
             lambda: torch.ops.svdkernels._cpp_lowrank_w4a16_linear(x, qw, s, Ld, Lu, bias, isa), ARGS,
             finite_input=finite)


@st.composite
def w4a4_operands(draw):
    M, N = draw(st.integers(0, 17)), draw(st.integers(1, 40))
    K, r = 64 * draw(st.integers(1, 10)), 16 * draw(st.integers(0, 2))  # 1 to 10 groups: tails of the block of 8
    dtype, unsigned = draw(st.sampled_from(FLOAT_DTYPES)), draw(st.booleans())
    x, finite = draw(values((M, K), dtype, special=draw(st.integers(0, 5)) == 0, magnitudes=(1.0, 1e-3, 1e2)))
    if unsigned:
        x = x.clamp(min=-0.171875)
    smooth = torch.rand(K, generator=torch.Generator().manual_seed(M * K + r)) + 0.25
    W, _ = draw(values((N, K), torch.float32, special=False, magnitudes=(1.0,)))
    qw, s = (t.contiguous() for t in quantize_weight(W, dtype=dtype))  # W may be strided
    Ld, Lu = torch.randn(r, K, dtype=dtype) / 8, torch.randn(N, r, dtype=dtype) / 8
    bias = torch.randn(N, dtype=dtype) if draw(st.booleans()) else None
    isa = draw(st.integers(-1, torch.ops.svdkernels._cpp_best_isa()))
    return x, smooth, qw, s, Ld, Lu, bias, unsigned, isa, finite


@fuzz(40)
@given(w4a4_operands())
def w4a4_pair_matches_reference(case):
    """The C++ W4A4 pair (any isa) against the reference: xq and xscale identical
    (NaN scales where the reference has them), the down projection and the GEMM to
    float32 rounding plus one rounding to the dtype."""
    x, smooth, qw, s, Ld, Lu, bias, unsigned, isa, finite = case
    out = run_case("_cpp_lowrank_quantize_act",
                   lambda: torch.ops.svdkernels._cpp_lowrank_quantize_act(x, smooth, Ld, unsigned, isa),
                   ["x", "smooth", "L_down", "isa"], finite_input=finite)
    if not out.ok:
        return
    xq, xs, act = out.value
    want = svdkernels.reference.lowrank_quant.lowrank_quantize_act(x, smooth, Ld, unsigned)
    if finite:  # an infinity's codes are whatever NaN -> int16 gives in torch
        assert torch.equal(xq, want[0]), "xq differs from the reference"
    assert torch.equal(xs.isnan(), want[1].isnan()) and torch.equal(xs.nan_to_num(), want[1].nan_to_num())
    if not finite:
        return
    torch.testing.assert_close(act, want[2], rtol=1e-5, atol=1e-5 * (float(want[2].abs().max()) + 1 if act.numel() else 1))
    y = run_case("_cpp_lowrank_w4a4_gemm",
                 lambda: torch.ops.svdkernels._cpp_lowrank_w4a4_gemm(xq, xs, qw, s, act, Lu, bias, unsigned, isa),
                 ["xq", "xscale", "qweight", "scales", "lowrank_act", "L_up", "bias", "isa"], finite_input=True)
    assert y.ok, f"consistent operands rejected: {y.error}"
    ref = svdkernels.reference.lowrank_quant.lowrank_w4a4_gemm(xq, xs, qw, s, act, Lu, bias, unsigned)
    err = float((y.value.float() - ref.float()).abs().max()) if ref.numel() else 0.0
    assert err <= TOL[x.dtype] * (float(ref.float().abs().max()) + 1 if ref.numel() else 1), err


def main(out_path: str) -> int:
    failures = []
    for test in (public_op_matches_reference, internal_op_validates, w4a4_pair_matches_reference):
        try:
            test()
        except Exception:  # noqa: BLE001 - reported to the parent
            failures.append(f"{test.__name__}:\n{traceback.format_exc()[-3000:]}")
    with open(out_path, "w") as f:
        json.dump({"counts": dict(COUNTS), "results": dict(RESULTS), "failures": failures}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
