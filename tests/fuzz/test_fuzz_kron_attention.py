"""Fuzz: kron_linear (wrapper, torch.ops), KronLinear, lowrank_attention (wrapper,
torch.ops), merge_attention, RoPE, xkv_compress, LowRankKVCache."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import svdkernels
from fuzz_support import FLOAT_DTYPES, ODD_DTYPES, fuzz, numbers, run_case, values
from svdkernels.adapters import KronLinear
from svdkernels.kv import LowRankKVCache, xkv_compress

pytestmark = pytest.mark.usefixtures("one_thread")

# Relative tolerance against the float64 result, by dtype (one rounding of the
# inputs plus fp32 accumulation of a few terms).
TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def _kron_dense(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    A = A.double().contiguous().reshape(-1, *A.shape[-2:])  # torch.kron needs contiguous inputs
    B = B.double().contiguous().reshape(-1, *B.shape[-2:])
    return sum(torch.kron(a, b) for a, b in zip(A, B))


@st.composite
def kron_case(draw):
    bad = draw(st.sampled_from([None] * 6 + ["zero-term", "zero-dim", "x-dim", "dtype", "mixed-dtype", "meta",
                                             "special", "scale", "terms"]))
    r = draw(st.integers(1, 3))
    a1, a2, b1, b2 = (draw(st.integers(1, 4)) for _ in range(4))
    if bad == "zero-dim":
        a1 = 0
    rA = 0 if bad == "zero-term" else r
    rB = r + 1 if bad == "terms" else rA
    dtype = draw(st.sampled_from(FLOAT_DTYPES + (torch.float64,))) if bad != "dtype" else torch.int32
    lead = draw(st.lists(st.integers(0, 3), max_size=2))
    K = a2 * b2 + (1 if bad == "x-dim" else 0)
    kw = dict(dtype=dtype if dtype.is_floating_point else torch.float32, magnitudes=(1.0, 1e-30, 1e-5, 1e5))
    x, fx = draw(values((*lead, K), special=bad == "special", **kw))
    A, fa = draw(values((rA, a1, a2), special=False, **kw))
    B, fb = draw(values((rB, b1, b2), special=False, **kw))
    if bad == "dtype":
        x = x.to(torch.int32)
    if bad == "mixed-dtype":
        B = B.to(torch.float64 if dtype != torch.float64 else torch.float32)
    if bad == "meta":
        x, A, B = x.to("meta"), A.to("meta"), B.to("meta")
    if not draw(st.booleans()) and A.shape[0] == 1:
        A = A[0]  # a single [p, q] factor
    scale = draw(numbers(st.floats(-4, 4))) if bad == "scale" else draw(st.floats(-4, 4))
    return x, A, B, scale, fx and fa and fb


@fuzz(60)
@given(kron_case(), st.booleans())
def test_kron_linear(case, through_ops):
    x, A, B, scale, finite = case
    if through_ops:
        As = [A] if A.dim() == 3 else [A[None]]
        call = lambda: torch.ops.svdkernels.kron_linear(x, As, [B], scale)  # noqa: E731
        entry = "torch.ops.svdkernels.kron_linear"
    else:
        call = lambda: svdkernels.kron_linear(x, A, B, scale=scale)  # noqa: E731
        entry = "kron_linear"
    out = run_case(entry, call, ["x", "A", "B", "scale"], finite_input=finite)
    if not out.ok or not finite or x.device.type == "meta" or x.numel() == 0:
        return
    want = x.double() @ _kron_dense(A, B).T * scale
    got = out.value.double()
    assert got.shape == want.shape
    # Relative to the largest output; values below the dtype's smallest normal
    # number may underflow (an fp16 product of 1e-5 factors is not representable).
    terms = A.shape[0] if A.dim() == 3 else 1
    err = float((got - want).abs().max())
    bound = TOL[x.dtype] * terms * float(want.abs().max()) + 4 * torch.finfo(x.dtype).tiny * x.shape[-1] * terms
    assert err <= bound, (err, bound)


@fuzz(25)
@given(st.data())
def test_kron_linear_layer(data):
    """``KronLinear``: SoKA leaves outputs unchanged at init, LoKr starts at zero."""
    out_f, in_f = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 12))
    dtype = data.draw(st.sampled_from((torch.float32, torch.float64)))
    base = nn.Linear(in_f, out_f).to(dtype)
    W, finite = data.draw(values((out_f, in_f), dtype, magnitudes=(1.0, 1e-30, 1e-3, 1e3)))
    with torch.no_grad():
        base.weight.copy_(W)
    kw = {}
    init = data.draw(st.sampled_from(["soka", "soka", "lokr", "pissa"]))
    if data.draw(st.booleans()):
        kw["rank"] = data.draw(st.one_of(st.integers(1, 3), st.sampled_from([0, -1, 1.5, True])))
    if data.draw(st.booleans()):
        kw["scale"] = data.draw(numbers(st.floats(0.1, 3)))
    if init == "soka" and "rank" not in kw:
        kw["energy"] = data.draw(numbers(st.floats(0.5, 1.0)))
    x = torch.randn(3, in_f, dtype=dtype)
    y0 = base(x).detach()
    out = run_case("KronLinear", lambda: KronLinear(base, init=init, seed=0, **kw),
                   ["base", "a_shape", "b_shape", "rank", "init", "energy", "elbow", "a_rank", "b_rank", "scale",
                    "seed", "W"], finite_input=finite)
    if out.ok and finite:
        y = out.value(x).detach()
        tol = 1e-4  # SoKA's KPSVD and residual run in float32, also for a float64 layer
        torch.testing.assert_close(y, y0, rtol=tol, atol=tol * float(y0.abs().max() + 1e-30))


# ---------------------------------------------------------------------------
# Attention


@st.composite
def attention_case(draw):
    bad = draw(st.sampled_from([None] * 8 + ["sm_scale", "rope", "seqlens", "shape", "dtype", "meta",
                                             "special", "zero"]))
    B, Hkv = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    Hq = Hkv * draw(st.integers(1, 2))
    d = 2 * draw(st.integers(1, 3))
    T, Sq = draw(st.integers(1, 6)), draw(st.integers(1, 3))
    if bad == "zero":
        T = 0
    rk, rv = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dtype = draw(st.sampled_from((torch.float32, torch.float64, torch.bfloat16))) if bad != "dtype" else torch.int32
    fdt = dtype if dtype.is_floating_point else torch.float32
    mags = (1.0, 1e-30, 1e-3, 1e3)
    q, f1 = draw(values((B, Hq, Sq, d), fdt, magnitudes=mags, special=bad == "special"))
    kl, f2 = draw(values((B, T, rk), fdt, magnitudes=mags, special=False))
    vl, f3 = draw(values((B, T, rv), fdt, magnitudes=mags, special=False))
    kb, f4 = draw(values((rk, Hkv * d + (1 if bad == "shape" else 0)), fdt, magnitudes=(1.0,), special=False))
    vb, f5 = draw(values((rv, Hkv * d), fdt, magnitudes=(1.0,), special=False))
    if bad == "dtype":
        q = q.to(dtype)
    if bad == "meta":
        q, kl, vl, kb, vb = (t.to("meta") for t in (q, kl, vl, kb, vb))
    kw = {}
    if draw(st.booleans()) or bad == "causal":
        # A non-bool causal ("no") is accepted as True today: test_known_failures.py.
        kw["causal"] = draw(st.booleans())
    if bad == "sm_scale":
        kw["sm_scale"] = draw(st.sampled_from([math.nan, math.inf, -1.0, 0.0, "1"]))
    if draw(st.booleans()) or bad == "rope":
        kw["rope"] = svdkernels.RoPE(theta=draw(st.sampled_from([10.0, 10000.0])),
                                     layout=draw(st.sampled_from(["neox", "interleaved"])))
        if bad == "rope":
            kw["rope"] = draw(st.sampled_from([(10000.0,), "neox", 1.0]))
    if bad == "seqlens" or draw(st.integers(0, 3)) == 0:
        L = torch.tensor([draw(st.integers(0, T)) for _ in range(B)])
        if bad == "seqlens":
            L = draw(st.sampled_from([L + T + 1, L.float(), L[:0], L - T - 1]))
        kw["cache_seqlens"] = L.to(q.device)
    return q, kl, vl, kb, vb, kw, all((f1, f2, f3, f4, f5))


ATTN_ARGS = ["q", "k_latent", "v_latent", "k_basis", "v_basis", "cache_seqlens", "rope", "causal", "sm_scale",
             "return_lse"]


@fuzz(60)
@given(attention_case())
def test_lowrank_attention(case):
    q, kl, vl, kb, vb, kw, finite = case
    out = run_case("lowrank_attention", lambda: svdkernels.lowrank_attention(q, kl, vl, kb, vb, return_lse=True,
                                                                             **kw),
                   ATTN_ARGS, finite_input=finite, overflow_ok=True)
    if not out.ok or not finite or q.device.type == "meta":
        return
    o, lse = out.value
    # Rows with no visible key are defined as out = 0, lse = -inf; every other value is finite.
    assert bool(torch.isfinite(o).all())
    assert not bool(torch.isnan(lse).any()) and not bool((lse == math.inf).any())
    if kl.shape[1] == 0:  # no keys at all: every row sees none
        assert not bool(o.any()) and bool((lse == -math.inf).all())
        return
    # Against dense attention on the reconstructed keys and values (float64).
    B, Hq, Sq, d = q.shape
    Hkv = kb.shape[-1] // d
    k = (kl.double() @ kb.double()).view(B, -1, Hkv, d).transpose(1, 2)
    v = (vl.double() @ vb.double()).view(B, -1, Hkv, d).transpose(1, 2)
    if "cache_seqlens" in kw:
        return  # ragged: dense_attention has no lengths; the op's own tests cover them
    ref, _ = svdkernels.ops.lowrank_attention.dense_attention(q.double(), k, v, rope=kw.get("rope"),
                                                              causal=kw.get("causal", True), sm_scale=None)
    scale = float(v.abs().max()) + 1e-300
    err = float((o.double() - ref).abs().max()) / scale
    assert err <= {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 5e-2}[q.dtype], err


@fuzz(40)
@given(attention_case())
def test_lowrank_attention_through_torch_ops(case):
    """The op's schema with primitive arguments: causal as given, rope θ and scaling raw."""
    q, kl, vl, kb, vb, kw, finite = case
    d = q.shape[-1]
    theta = 10000.0
    seq = kw.get("cache_seqlens")
    causal = kw.get("causal", True)
    if not isinstance(causal, bool):
        return  # the schema's bool does not take "no" (the dispatcher's TypeError is the wrapper's job)
    run_case("torch.ops.svdkernels.lowrank_attention",
             lambda: torch.ops.svdkernels.lowrank_attention(q, kl, vl, kb, vb, seq, causal, 1.0 / math.sqrt(d),
                                                            "rope" in kw, theta, 1.0, 0, d),
             ATTN_ARGS + ["rope_theta", "rope_scaling", "rope_layout", "rotary_dim"], finite_input=finite,
             overflow_ok=True)


@fuzz(30)
@given(st.data())
def test_merge_attention(data):
    shape = (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)), 4)
    bad = data.draw(st.sampled_from([None] * 4 + ["shape", "lse-shape", "special"]))
    o1, f1 = data.draw(values(shape, special=False))
    o2, f2 = data.draw(values(shape if bad != "shape" else (*shape[:3], 5), special=False))
    l1, f3 = data.draw(values(shape[:3] if bad != "lse-shape" else shape[:2], special=bad == "special"))
    l2 = torch.where(torch.rand(shape[:3]) < 0.3, -math.inf, torch.randn(shape[:3]))  # -inf: no keys on that side
    out = run_case("merge_attention", lambda: svdkernels.merge_attention(o1, l1, o2, l2),
                   ["out1", "lse1", "out2", "lse2"], finite_input=f1 and f2 and f3)
    if out.ok and f3:
        o, lse = out.value
        assert bool(torch.isfinite(o).all())


@fuzz(30)
@given(st.data())
def test_rope(data):
    bad = data.draw(st.sampled_from([None] * 3 + ["theta", "scaling", "layout", "rotary_dim"]))
    theta = data.draw(numbers(st.floats(1.0, 1e6)) if bad == "theta" else st.floats(1.0, 1e6))
    scaling = data.draw(numbers(st.floats(0.5, 4.0)) if bad == "scaling" else st.floats(0.5, 4.0))
    layout = data.draw(st.sampled_from(["gptj", 3, None] if bad == "layout" else ["neox", "interleaved"]))
    rotary_dim = data.draw(st.sampled_from([-2, 0, 3, 2.0, True]) if bad == "rotary_dim"
                           else st.one_of(st.none(), st.sampled_from([2, 4, 8])))
    out = run_case("RoPE", lambda: svdkernels.RoPE(theta=theta, scaling=scaling, layout=layout, rotary_dim=rotary_dim),
                   ["rope", "theta", "scaling", "layout", "rotary_dim"], finite_input=True)
    if out.ok:
        assert math.isfinite(out.value.theta) and out.value.theta > 0 and out.value.scaling > 0


# ---------------------------------------------------------------------------
# KV caches


@st.composite
def kv_case(draw):
    bad = draw(st.sampled_from([None] * 5 + ["special", "empty", "layers", "dtype", "group", "rank", "energy",
                                             "meta"]))
    L, B, T, n = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    if bad == "empty":
        T = 0
    dtype = draw(st.sampled_from(FLOAT_DTYPES)) if bad != "dtype" else draw(st.sampled_from(ODD_DTYPES))
    fdt = dtype if dtype.is_floating_point else torch.float32
    mags = (1.0, 1e-30, 1e30, 1e-3) if fdt != torch.float16 else (1.0, 1e-3)
    keys, values_, finite = [], [], True
    for i in range(L):
        k, fk = draw(values((B, T, n), fdt, magnitudes=mags, special=bad == "special" and i == L - 1))
        v, fv = draw(values((B, T, n), fdt, magnitudes=mags, special=False))
        keys.append(k.to(dtype))
        values_.append(v.to(dtype))
        finite = finite and fk and fv
    if bad == "layers":
        values_ = values_[:-1] or [values_[0][:, :0]]
    if bad == "meta":
        keys = [k.to("meta") for k in keys]
    kw = dict(group_size=draw(st.integers(1, 3)))
    if bad == "group":
        kw["group_size"] = draw(st.sampled_from([0, -1, 1.5, True]))
    if draw(st.booleans()) or bad == "rank":
        kw["rank_k"] = draw(st.integers(1, 8)) if bad != "rank" else draw(st.sampled_from([0, -1, 2.5]))
    if draw(st.booleans()) or bad == "energy":
        kw["energy"] = draw(st.floats(0.5, 1.0)) if bad != "energy" else draw(numbers(st.floats(0.5, 1.0)))
    return keys, values_, kw, finite


@fuzz(40)
@given(kv_case())
def test_xkv_compress(case):
    keys, vals, kw, finite = case
    out = run_case("xkv_compress", lambda: xkv_compress(keys, vals, **kw),
                   ["keys", "values", "group_size", "rank_k", "rank_v", "energy", "seed", "oversample", "n_iter"],
                   finite_input=finite)
    if not out.ok or not finite:
        return
    groups = out.value
    assert [i for g in groups for i in g.layers] == list(range(len(keys)))
    for g in groups:
        for j, i in enumerate(g.layers):
            full = kw.get("rank_k") is None and kw.get("energy") is None
            if full and keys[i].dtype == torch.float32:
                # Full rank: the reconstruction is the input up to fp32 rounding, at any magnitude.
                scale = float(keys[i].abs().max()) + 1e-300
                err = float((g.keys(j).double() - keys[i].double()).abs().max()) / scale
                assert err < 1e-3, err


@fuzz(25)
@given(st.data())
def test_lowrank_kv_cache(data):
    n_layers = data.draw(st.integers(1, 2))
    Hkv, d = 1, 4
    kw = dict(num_layers=n_layers, window=data.draw(st.one_of(st.integers(0, 3), st.sampled_from([-1, 1.5]))))
    if data.draw(st.booleans()):
        kw["rank_k"] = data.draw(st.one_of(st.integers(1, 4), st.sampled_from([0, -1])))
    cache = run_case("LowRankKVCache", lambda: LowRankKVCache(**kw),
                     ["num_layers", "window", "group_size", "rank_k", "rank_v", "energy", "rope", "seed"],
                     finite_input=True)
    if not cache.ok:
        return
    cache = cache.value
    T = data.draw(st.integers(0, 5))
    finite = True
    for i in range(n_layers):
        k, fk = data.draw(values((1, T, Hkv * d), special=data.draw(st.integers(0, 4)) == 0))
        v, fv = data.draw(values((1, T, Hkv * d), special=False))
        finite = finite and fk and fv
        out = run_case("LowRankKVCache.prefill", lambda: cache.prefill(i, k, v),
                       ["layer_idx", "keys", "values"], finite_input=fk and fv)
        if not out.ok:
            return
    out = run_case("LowRankKVCache.compress", lambda: cache.compress(), ["group_idx", "keys", "values"],
                   finite_input=finite)
    if not out.ok:
        return
    q, fq = data.draw(values((1, 1, 1, d), special=False))
    run_case("LowRankKVCache.attend", lambda: cache.attend(0, q), ["layer_idx", "q", "sm_scale"],
             finite_input=finite and fq)
