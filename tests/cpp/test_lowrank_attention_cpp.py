"""The C++ decode kernel of lowrank_attention (csrc/cpu/lowrank_attention*.cpp), every
instruction-set path this CPU runs (portable C++, AVX2, AVX-512), against the
reference backend in float64 on the same inputs: absorbed and pre-RoPE modes (neox,
interleaved, partial rotary, unrotated keys), 1 and 3 query tokens, causal or not,
ragged lengths including 0 and 1, shared and per-sequence bases, float32 and
bfloat16 latents, shapes that are not multiples of the tile or the vector width;
garbage past the valid prefix; large positions; thread-count independence; the
internal op's contract and the public op's dispatch.

Skipped when svdkernels._C is not built, unless SVDKERNELS_REQUIRE_EXTENSION=1.
"""
import math

import pytest
import torch

import svdkernels
from svdkernels.backends import use_backend
from svdkernels.ops import lowrank_attention_cpp as cpp
from svdkernels.reference import lowrank_attention as ref

from cpp_support import ISA_NAMES, isas, require_extension  # noqa: E402 (tests/cpp on sys.path)

require_extension()

OP = torch.ops.svdkernels._cpp_lowrank_attention_decode.default
ISAS = isas()

# (rope flag, theta, scaling, layout, rotary_dim or None for d); None: absorbed.
MODES = {
    "absorbed": None,
    "unrotated": (False, 10000.0, 1.0, 0, None),
    "neox": (True, 100.0, 1.0, 0, None),
    "interleaved": (True, 10000.0, 2.0, 1, None),
    "partial": (True, 500000.0, 1.0, 0, 8),
}


def problem(B, Hq, Hkv, Sq, T, d, rk, rv, dtype, per_seq=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = Hkv * d
    lead = (B,) if per_seq else ()
    ts = [torch.randn(B, Hq, Sq, d, generator=g), torch.randn(B, T, rk, generator=g),
          torch.randn(B, T, rv, generator=g), torch.randn(*lead, rk, n, generator=g) / math.sqrt(rk),
          torch.randn(*lead, rv, n, generator=g) / math.sqrt(rv)]
    return [t.to(dtype) for t in ts]


def run(tensors, seqlens, mode, causal=True, isa=-1):
    """(cpp out, cpp lse, float64 reference out, lse) for one call."""
    q, Ck, Cv, Wk, Wv = tensors
    d = q.shape[-1]
    scale = 1 / math.sqrt(d)
    spec = MODES[mode]
    rope_args = ref_args = (False, 10000.0, 1.0, 0, 0)
    absorb = spec is None
    if spec is not None:
        flag, theta, scaling, layout, rdim = spec
        rope_args = (flag, theta, scaling, layout, rdim or d)
    out, lse = cpp.lowrank_attention(q, Ck, Cv, Wk, Wv, seqlens, causal, scale, *rope_args, isa=isa, absorb=absorb)
    want, want_lse = ref.lowrank_attention(*[t.double() for t in tensors], seqlens, causal, scale, *rope_args)
    return out, lse, want, want_lse


def check(out, lse, want, want_lse, dtype):
    assert out.dtype == dtype and out.shape == want.shape and lse.dtype == torch.float32
    # float32 products over a few hundred terms, then the output's own rounding.
    tol = 3e-5 * want.abs().max().clamp_min(1e-30) + (2.0**-8 if dtype == torch.bfloat16 else 2.0**-24) * want.abs()
    err = (out.double() - want).abs()
    assert bool((err <= tol).all()), f"max excess {float((err - tol).max()):.3g}"
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    fin = torch.isfinite(want_lse)
    assert bool(((lse.double() - want_lse).abs()[fin] <= 1e-5 * (1 + want_lse.abs()[fin])).all())


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES.get)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("Sq", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_against_reference_ragged(isa, mode, Sq, dtype):
    # T = 300 crosses several tiles of 32 and two work items; d = 24, rk = 40, rv = 20
    # are not multiples of 16 (AVX-512) and leave remainders everywhere.
    tensors = problem(B=4, Hq=6, Hkv=3, Sq=Sq, T=300, d=24, rk=40, rv=20, dtype=dtype)
    seqlens = torch.tensor([0, 1, 300, 97], dtype=torch.int32)
    for causal in (True, False):
        out, lse, want, want_lse = run(tensors, seqlens, mode, causal, isa)
        check(out, lse, want, want_lse, dtype)
    # Length 0: no key, out 0 and lse -inf; length 1 with Sq = 3, causal: rows 0 and 1 see nothing.
    out, lse, _, _ = run(tensors, seqlens, mode, True, isa)
    assert bool((out[0] == 0).all()) and bool(torch.isneginf(lse[0]).all())
    if Sq == 3:
        assert bool(torch.isneginf(lse[1, :, :2]).all()) and bool(torch.isfinite(lse[1, :, 2]).all())


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES.get)
@pytest.mark.parametrize("mode", ["absorbed", "neox"])
def test_full_cache_and_per_sequence_bases(isa, mode):
    tensors = problem(B=2, Hq=8, Hkv=2, Sq=1, T=70, d=32, rk=64, rv=48, dtype=torch.float32, per_seq=True)
    check(*run(tensors, None, mode, True, isa), torch.float32)


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES.get)
@pytest.mark.parametrize("mode", ["absorbed", "interleaved"])
def test_garbage_past_the_prefix_is_never_read(isa, mode):
    tensors = problem(B=2, Hq=4, Hkv=2, Sq=1, T=90, d=16, rk=24, rv=24, dtype=torch.float32)
    seqlens = torch.tensor([33, 64], dtype=torch.int64)
    clean = run(tensors, seqlens, mode, True, isa)
    for t in tensors[1:3]:
        t[0, 33:] = float("nan")
        t[1, 64:] = float("inf")
    dirty = run(tensors, seqlens, mode, True, isa)
    assert torch.equal(clean[0], dirty[0]) and torch.equal(clean[1], dirty[1])


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES.get)
def test_large_positions(isa):
    # Angles up to 40k radians (theta = 1): the in-register sin/cos reduction.
    tensors = problem(B=1, Hq=2, Hkv=1, Sq=1, T=40000, d=8, rk=4, rv=4, dtype=torch.float32)
    q, Ck, Cv, Wk, Wv = tensors
    scale = 1 / math.sqrt(8)
    args = (None, True, scale, True, 1.0, 1.0, 0, 8)
    out, lse = cpp.lowrank_attention(q, Ck, Cv, Wk, Wv, *args, isa=isa)
    want, want_lse = ref.lowrank_attention(q.double(), Ck.double(), Cv.double(), Wk.double(), Wv.double(), *args)
    check(out, lse, want, want_lse, torch.float32)


def test_kernel_independent_of_thread_count():
    # The kernel's items depend on the lengths only (torch's own GEMMs around it
    # may round differently with the thread count; the kernel must not).
    g = torch.Generator().manual_seed(1)
    q, Ck, Cv = torch.randn(2, 8, 16, generator=g), torch.randn(2, 3000, 32, generator=g), torch.randn(2, 3000, 24, generator=g)
    Wk, freq = torch.randn(1, 32, 32, generator=g), torch.rand(8, generator=g)
    seqlens = torch.tensor([2999, 1500])
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(OP(q, Ck, Cv, Wk, freq, seqlens, 1, True, 0, -1))
    finally:
        torch.set_num_threads(threads)
    for o, lse in results[1:]:
        assert torch.equal(o, results[0][0]) and torch.equal(lse, results[0][1])


def test_public_op_dispatch():
    q, Ck, Cv, Wk, Wv = problem(B=2, Hq=4, Hkv=2, Sq=1, T=50, d=16, rk=8, rv=8, dtype=torch.float32)
    seqlens = torch.tensor([50, 7])
    rope = svdkernels.RoPE(theta=1000.0)
    with use_backend("cpp"):
        got = svdkernels.lowrank_attention(q, Ck, Cv, Wk, Wv, cache_seqlens=seqlens, rope=rope)
        with pytest.raises(RuntimeError, match="float32 or bfloat16"):
            svdkernels.lowrank_attention(*[t.half() for t in (q, Ck, Cv, Wk, Wv)], rope=rope)
    with use_backend("reference"):
        want = svdkernels.lowrank_attention(q, Ck, Cv, Wk, Wv, cache_seqlens=seqlens, rope=rope)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert cpp.cpp_supports(q) and not cpp.cpp_supports(q.double()) and not cpp.cpp_supports(q.repeat(1, 1, 17, 1))


def test_internal_op_contract():
    q = torch.randn(1, 4, 8)
    Ck, Cv = torch.randn(1, 10, 8), torch.randn(1, 10, 6)
    with pytest.raises(ValueError, match="isa"):
        OP(q, Ck, Cv, None, None, None, 1, True, 0, torch.ops.svdkernels._cpp_best_isa() + 1)
    with pytest.raises(ValueError, match="cache_seqlens"):
        OP(q, Ck, Cv, None, None, torch.tensor([11]), 1, True, 0, -1)
    with pytest.raises(TypeError, match="v_latent"):
        OP(q, Ck, Cv.bfloat16(), None, None, None, 1, True, 0, -1)
    with pytest.raises(ValueError, match="rk"):
        OP(torch.randn(1, 4, 7), Ck, Cv, None, None, None, 1, True, 0, -1)
    with pytest.raises(ValueError, match="k_basis"):
        OP(q, Ck, Cv, torch.randn(1, 8, 12), None, None, 1, True, 0, -1)
    with pytest.raises(ValueError, match="Sq"):
        OP(q, Ck, Cv, None, None, None, 3, True, 0, -1)
    o, lse = OP(q, Ck, Cv, None, None, torch.tensor([0]), 1, True, 0, -1)
    assert o.shape == (1, 4, 6) and bool((o == 0).all()) and bool(torch.isneginf(lse).all())
