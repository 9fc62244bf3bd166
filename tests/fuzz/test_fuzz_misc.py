"""Fuzz: kron_linear's backward (against autograd through the dense Kronecker
product), the int4 packing and activation formats, near_square_factors, use_backend,
lowrank_attention_with_tail."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import svdkernels
from fuzz_support import FLOAT_DTYPES, fuzz, run_case, values
from svdkernels.adapters import near_square_factors
from svdkernels.quant import dequantize_act, pack_int4, quantize_act, unpack_int4

pytestmark = pytest.mark.usefixtures("one_thread")


@fuzz(30)
@given(st.data())
def test_kron_linear_backward(data):
    """Gradients of x, A and B (dense or low-rank pairs) equal autograd's through
    ``x @ (Σ A_i ⊗ B_i)ᵀ · scale`` in float64."""
    r = data.draw(st.integers(1, 3))
    a1, a2, b1, b2 = (data.draw(st.integers(1, 4)) for _ in range(4))
    lead = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=2))
    dtype = data.draw(st.sampled_from((torch.float32, torch.float64)))
    x, _ = data.draw(values((*lead, a2 * b2), dtype, special=False, magnitudes=(1.0, 1e-3, 1e3)))
    low_rank = data.draw(st.booleans())
    if low_rank:
        k = data.draw(st.integers(1, 3))
        A = (torch.randn(r, a1, k, dtype=dtype), torch.randn(r, k, a2, dtype=dtype))
    else:
        A = (torch.randn(r, a1, a2, dtype=dtype),)
    B = (torch.randn(r, b1, b2, dtype=dtype),)
    scale = data.draw(st.floats(-3, 3))
    leaves = [t.detach().clone().requires_grad_() for t in (x, *A, *B)]
    xs, As, Bs = leaves[0], leaves[1:1 + len(A)], leaves[1 + len(A):]
    out = run_case("kron_linear (backward)",
                   lambda: svdkernels.kron_linear(xs, tuple(As) if low_rank else As[0], Bs[0], scale=scale),
                   ["x", "A", "B", "scale"], finite_input=True)
    if not out.ok:
        return
    gy = torch.randn_like(out.value)
    out.value.backward(gy)
    ref = [t.detach().double().requires_grad_() for t in (x, *A, *B)]
    Ad = ref[1] @ ref[2] if low_rank else ref[1]
    W = sum(torch.kron(Ad[i], ref[-1][i]) for i in range(r))
    (ref[0] @ W.T * scale).backward(gy.double())
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for got, want in zip(leaves, ref):
        assert got.grad is not None
        scale_ = float(want.grad.abs().max()) + 1e-30
        assert float((got.grad.double() - want.grad).abs().max()) <= tol * scale_ * 10, "gradient mismatch"


@fuzz(40)
@given(st.data())
def test_int4_formats(data):
    bad = data.draw(st.sampled_from([None] * 4 + ["K", "dtype", "special", "smooth"]))
    K = 64 * data.draw(st.integers(1, 2)) + (3 if bad == "K" else 0)
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES))
    x, finite = data.draw(values((data.draw(st.integers(0, 3)), K), dtype, special=bad == "special",
                                 magnitudes=(1.0, 1e-30, 1e-3, 1e3)))
    if bad == "dtype":
        x = x.to(torch.int32)
    unsigned = data.draw(st.booleans())
    if unsigned and x.is_floating_point():
        x = x.abs()
    smooth = torch.rand(K) + 0.5 if bad != "smooth" else torch.rand(K + 1)
    out = run_case("quantize_act", lambda: quantize_act(x, unsigned=unsigned, smooth=smooth),
                   ["x", "unsigned", "smooth"], finite_input=finite)
    if not out.ok or not finite:
        return
    xq, xs = out.value
    back = run_case("dequantize_act", lambda: dequantize_act(xq, xs, unsigned=unsigned),
                    ["xq", "xscale", "unsigned", "dtype"], finite_input=True)
    q = unpack_int4(xq, signed=not unsigned)
    assert torch.equal(pack_int4(q, signed=not unsigned), xq)
    assert back.value.shape == x.shape


@fuzz(30)
@given(st.data())
def test_pack_int4(data):
    signed = data.draw(st.booleans())
    lo, hi = (-8, 7) if signed else (0, 15)
    bad = data.draw(st.sampled_from([None] * 3 + ["range", "odd", "dtype"]))
    n = 2 * data.draw(st.integers(0, 8)) + (1 if bad == "odd" else 0)
    q = torch.randint(lo, hi + 1, (data.draw(st.integers(1, 3)), n), dtype=torch.int8)
    if bad == "range" and q.numel():
        q.view(-1)[0] = hi + 1 if hi < 127 else lo - 1
    if bad == "dtype":
        q = q.float()
    out = run_case("pack_int4", lambda: pack_int4(q, signed=signed), ["q", "signed"], finite_input=True)
    if out.ok:
        assert torch.equal(unpack_int4(out.value, signed=signed), q.to(torch.int8))


@fuzz(30)
@given(st.one_of(st.integers(-3, 5000), st.sampled_from([1.5, True, "8", None])),
       st.one_of(st.just(-1), st.integers(-3, 64)))
def test_near_square_factors(dimension, factor):
    out = run_case("near_square_factors", lambda: near_square_factors(dimension, factor), ["dimension", "factor"],
                   finite_input=True)
    if out.ok:
        m, n = out.value
        assert m * n == dimension and 1 <= m


@fuzz(15)
@given(st.sampled_from(["reference", "triton", "cpp", "REFERENCE", "cuda", "", None, 3]))
def test_use_backend(name):
    def enter():
        with svdkernels.use_backend(name):
            return True

    run_case("use_backend", enter, ["name"], finite_input=True)


@fuzz(25)
@given(st.data())
def test_lowrank_attention_with_tail(data):
    B, Hkv, d, T = 1, 1, 4, data.draw(st.integers(0, 4))
    S = data.draw(st.integers(0, 3))
    Sq = data.draw(st.integers(1, 3))
    q, f1 = data.draw(values((B, 2 * Hkv, Sq, d), special=data.draw(st.integers(0, 5)) == 0))
    kl, vl = torch.randn(B, T, 2), torch.randn(B, T, 2)
    kb, vb = torch.randn(2, Hkv * d), torch.randn(2, Hkv * d)
    kt, vt = torch.randn(B, Hkv, S, d), torch.randn(B, Hkv, S, d)
    out = run_case("lowrank_attention_with_tail",
                   lambda: svdkernels.lowrank_attention_with_tail(q, kl, vl, kb, vb, kt, vt, return_lse=True),
                   ["q", "k_latent", "v_latent", "k_basis", "v_basis", "k_tail", "v_tail", "cache_seqlens", "rope",
                    "sm_scale", "return_lse", "k", "v"], finite_input=f1)
    if out.ok and f1:
        o, lse = out.value
        assert bool(torch.isfinite(o).all()) and not bool(torch.isnan(lse).any())
