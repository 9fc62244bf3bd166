"""Fuzz: the int4 formats, the three low-rank + 4-bit ops (wrappers and torch.ops,
reference backend: the C++ kernel is fuzzed in a subprocess, test_fuzz_cpp.py),
LowRankQuantLinear, quantize_model and quantize_model_rtn."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import svdkernels
from fuzz_support import FLOAT_DTYPES, ODD_DTYPES, fuzz, numbers, run_case, values
from svdkernels.quant import (
    LowRankQuantLinear,
    dequantize_weight,
    quantize_model,
    quantize_model_rtn,
    quantize_weight,
)

pytestmark = pytest.mark.usefixtures("one_thread")

W4A16_ARGS = ["x", "qweight", "scales", "L_down", "L_up", "bias", "K"]
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@st.composite
def w4a16_case(draw):
    """Operands of ``lowrank_w4a16_linear`` from a real quantisation, then one thing made wrong."""
    bad = draw(st.sampled_from([None] * 8 + ["K", "rank", "qweight-dtype", "scales-dtype", "bias-shape", "meta",
                                             "mixed-meta", "special", "L_up-shape", "noncontig", "x-dtype"]))
    N, K = draw(st.integers(1, 5)), 64 * draw(st.integers(1, 2))
    r = 16 * draw(st.integers(0, 1)) if bad != "rank" else 8
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    lead = draw(st.lists(st.integers(0, 3), max_size=2))
    W, _ = draw(values((N, K), torch.float32, special=False, magnitudes=(1.0, 1e-3, 1e3)))
    qw, s = quantize_weight(W, dtype=dtype)
    # float16 tops out at 65504: inputs of 1e3 would overflow the exact result itself.
    x, fx = draw(values((*lead, K if bad != "K" else K + 1), dtype, special=bad == "special",
                        magnitudes=(1.0, 1e-3) if dtype == torch.float16 else (1.0, 1e-3, 1e3)))
    Ld = torch.randn(r, K, dtype=dtype) / 8
    Lu = torch.randn(N + (1 if bad == "L_up-shape" else 0), r, dtype=dtype) / 8
    bias = torch.randn(N + (1 if bad == "bias-shape" else 0), dtype=dtype) if draw(st.booleans()) else None
    if bad == "qweight-dtype":
        qw = qw.to(torch.int32)
    if bad == "scales-dtype":
        s = s.to(torch.float64)
    if bad == "x-dtype":
        x = x.to(draw(st.sampled_from(ODD_DTYPES)))
    if bad == "noncontig":
        s = torch.cat([s, s], 1)[:, : s.shape[1]]  # a non-contiguous view
    if bad == "meta":
        x, qw, s, Ld, Lu = (t.to("meta") for t in (x, qw, s, Ld, Lu))
        bias = None if bias is None else bias.to("meta")
    if bad == "mixed-meta":
        x = x.to("meta")
    return x, qw, s, Ld, Lu, bias, fx


def _w4a16_reference(x, qw, s, Ld, Lu, bias):
    Wd = dequantize_weight(qw, s, dtype=torch.float32).double()
    y = x.double() @ Wd.T + (x.double() @ Ld.double().T) @ Lu.double().T
    return y if bias is None else y + bias.double()


@fuzz(60)
@given(w4a16_case(), st.booleans())
def test_lowrank_w4a16_linear(case, through_ops):
    x, qw, s, Ld, Lu, bias, finite = case
    with svdkernels.use_backend("reference"):
        if through_ops:
            out = run_case("torch.ops.svdkernels.lowrank_w4a16_linear",
                           lambda: torch.ops.svdkernels.lowrank_w4a16_linear(x, qw, s, Ld, Lu, bias), W4A16_ARGS,
                           finite_input=finite)
        else:
            out = run_case("lowrank_w4a16_linear",
                           lambda: svdkernels.lowrank_w4a16_linear(x, qw, s, L_down=Ld, L_up=Lu, bias=bias),
                           W4A16_ARGS, finite_input=finite)
    if not out.ok or not finite or x.device.type == "meta":
        return
    assert out.value.device == x.device and out.value.dtype == x.dtype
    want = _w4a16_reference(x, qw, s, Ld, Lu, bias)
    err = float((out.value.double() - want).abs().max()) if want.numel() else 0.0
    assert err <= TOL[x.dtype] * (float(want.abs().max()) + 1) if want.numel() else True, err


@st.composite
def w4a4_case(draw):
    bad = draw(st.sampled_from([None] * 6 + ["K", "smooth-shape", "smooth-special", "x-special", "unsigned",
                                             "rank", "meta"]))
    N, K = draw(st.integers(1, 4)), 64 * draw(st.integers(1, 2))
    r = 16 * draw(st.integers(0, 1)) if bad != "rank" else 3
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    x, fx = draw(values((draw(st.integers(0, 3)), K if bad != "K" else K - 1), dtype, special=bad == "x-special",
                        magnitudes=(1.0, 1e-3) if dtype == torch.float16 else (1.0, 1e-3, 1e3)))
    smooth = torch.rand(K if bad != "smooth-shape" else K + 1) + 0.5  # positive: 0 and < 0 in test_known_failures
    if bad == "smooth-special":
        smooth[0] = draw(st.sampled_from([math.nan, math.inf]))
    Ld = torch.randn(r, K, dtype=dtype) / 8
    # float16 scales and outputs: weights near 1 (as x above). Larger ones either do
    # not fit the scales (quantize_weight says so, naming W) or make the exact product
    # exceed float16's range, where inf is the correctly rounded result, not a bug.
    W, _ = draw(values((N, K), torch.float32, special=False,
                       magnitudes=(1.0, 1e-3) if dtype == torch.float16 else (1.0, 1e-3, 1e3)))
    qw, s = quantize_weight(W, dtype=dtype)
    Lu = torch.randn(N, r, dtype=dtype) / 8
    unsigned = draw(st.booleans()) if bad != "unsigned" else "yes"
    if bad == "meta":
        x = x.to("meta")
    return x, smooth, Ld, qw, s, Lu, unsigned, fx and bad != "smooth-special"


@fuzz(50)
@given(w4a4_case())
def test_lowrank_w4a4_pair(case):
    x, smooth, Ld, qw, s, Lu, unsigned, finite = case
    with svdkernels.use_backend("reference"):
        out = run_case("lowrank_quantize_act",
                       lambda: svdkernels.lowrank_quantize_act(x, smooth, Ld, unsigned=unsigned),
                       ["x", "smooth", "L_down", "unsigned", "K"], finite_input=finite)
        if not out.ok:
            return
        xq, xs, act = out.value
        run_case("lowrank_w4a4_gemm",
                 lambda: svdkernels.lowrank_w4a4_gemm(xq, xs, qw, s, lowrank_act=act, L_up=Lu, unsigned=unsigned),
                 ["xq", "xscale", "qweight", "scales", "lowrank_act", "L_up", "bias", "unsigned"],
                 finite_input=finite)


@fuzz(40)
@given(st.data())
def test_quantize_weight_round_trip(data):
    bad = data.draw(st.sampled_from([None] * 4 + ["K", "special", "dtype", "dim"]))
    N, K = data.draw(st.integers(0, 4)), 64 * data.draw(st.integers(1, 2)) + (5 if bad == "K" else 0)
    W, finite = data.draw(values((N, K) if bad != "dim" else (K,), data.draw(st.sampled_from(FLOAT_DTYPES)),
                                 special=bad == "special", magnitudes=(1.0, 1e-30, 1e-3, 1e3)))
    if bad == "dtype":
        W = W.to(torch.int32)
    out = run_case("quantize_weight", lambda: quantize_weight(W), ["W", "dtype"], finite_input=finite)
    if not out.ok or not finite:
        return
    qw, s = out.value
    back = run_case("dequantize_weight", lambda: dequantize_weight(qw, s, dtype=torch.float32),
                    ["qweight", "scales", "dtype"], finite_input=True)
    # Round to nearest: each entry within half a step (its group's scale) of the weight.
    step = s.float().repeat_interleave(64, dim=1)
    assert bool(((back.value - W.float()).abs() <= step * 0.5 * (1 + 1e-3) + 1e-30).all())


@fuzz(25)
@given(st.data())
def test_lowrank_quant_linear_from_float(data):
    bad = data.draw(st.sampled_from([None] * 4 + ["rank", "smooth", "special", "acts", "unsigned", "refine"]))
    N, K = data.draw(st.integers(1, 40)), 64
    W, finite = data.draw(values((N, K), torch.float32, special=bad == "special",
                                 magnitudes=(1.0, 1e-30, 1e-3, 1e3)))
    kw = dict(rank=16 * data.draw(st.integers(0, 1)) if N >= 16 else 0, refine_iters=data.draw(st.integers(0, 1)))
    if bad == "rank":
        kw["rank"] = data.draw(st.sampled_from([8, -16, 1.5, 64]))
    if bad == "smooth":
        kw["smooth"] = data.draw(st.sampled_from([torch.zeros(K), -torch.ones(K), torch.full((K,), math.nan),
                                                  torch.ones(K + 1)]))
    if bad == "acts":
        kw["acts"] = "int8"
    if bad == "unsigned":
        kw.update(acts=None, unsigned=True)
    if bad == "refine":
        kw["refine_iters"] = -1
    out = run_case("LowRankQuantLinear.from_float", lambda: LowRankQuantLinear.from_float(W, **kw),
                   ["weight", "bias", "smooth", "rank", "refine_iters", "acts", "unsigned", "dtype", "seed"],
                   finite_input=finite)
    if out.ok:
        x = torch.randn(3, K)
        y = out.value(x).double()
        want = x.double() @ W.double().T
        # 4-bit weights (and activations): an SQNR floor, scale-free, any magnitude of W.
        err = float((y - want).norm() / want.norm()) if want.norm() > 0 else float(y.norm())
        assert err < 0.5, err


class _Net(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.a = nn.Linear(64, hidden)
        self.b = nn.Linear(hidden, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@fuzz(12)
@given(st.data())
def test_quantize_model(data):
    bad = data.draw(st.sampled_from([None] * 3 + ["calib-nan", "calib-empty", "rank", "alphas", "targets",
                                                   "typo", "weight-nan"]))
    torch.manual_seed(data.draw(st.integers(0, 100)))
    model = _Net(64 * data.draw(st.integers(1, 2)))
    x, finite = data.draw(values((8, 64), special=False, magnitudes=(1.0, 1e-3, 1e3)))
    if bad == "calib-nan":
        x[data.draw(st.integers(0, 7)), data.draw(st.integers(0, 63))] = data.draw(st.sampled_from([math.nan, math.inf]))
        finite = False
    calib = [x] if bad != "calib-empty" else []
    kw = dict(rank=16, alphas=[0.5], refine_iters=0, acts=data.draw(st.sampled_from(["int4", None])))
    if bad == "rank":
        kw["rank"] = data.draw(st.sampled_from([8, -16, 128, 1.5]))
    if bad == "alphas":
        kw["alphas"] = data.draw(st.sampled_from([[math.nan], [1.5], [], "0.5"]))
    if bad == "targets":
        kw["targets"] = data.draw(st.sampled_from([["nope"], 3, "c"]))
    if bad == "typo":
        kw["refine_iter"] = 1
    if bad == "weight-nan":
        with torch.no_grad():
            model.a.weight[0, 0] = math.nan
    rtn = data.draw(st.integers(0, 3)) == 0
    if rtn:
        out = run_case("quantize_model_rtn", lambda: quantize_model_rtn(model, acts=kw["acts"]),
                       ["model", "acts", "targets", "dtype"], finite_input=bad != "weight-nan")
    else:
        out = run_case("quantize_model", lambda: quantize_model(model, calib, **kw),
                       ["model", "calib_batches", "rank", "weights", "acts", "targets", "alphas", "act_stat",
                        "refine_iters", "unsigned", "dtype", "max_rows", "seed", "refine_iter"],
                       finite_input=finite and bad != "weight-nan")
    if not finite and not rtn:
        assert not out.ok and "calib_batches" in str(out.error)  # blamed on the data, not the weight
    if out.ok:
        assert isinstance(out.value.a, LowRankQuantLinear)
        assert bool(torch.isfinite(out.value(torch.randn(2, 64))).all())
