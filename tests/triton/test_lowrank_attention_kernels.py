"""Triton kernel of lowrank_attention (levels 2 and 3 of DESIGN.md's verification plan).

Level 2: the op forced onto the triton backend against the reference backend (whose
own tests check it against float64 SDPA on reconstructed keys). Without a GPU the
kernel runs through the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), so sizes are small: T not a multiple of the key tile, ranks
and head dims not powers of two where the layout allows, decode (Sq = 1) and
prefill (Sq = 5, causal bottom-right), ragged lengths including 0 and one below
Sq, neox / interleaved / partial RoPE, absorbed (MLA) mode, shared and
per-sequence bases. A small config makes the same shapes span several key tiles,
feature chunks, rank chunks, row blocks, rv blocks and splits.

Level 3: every config × dtype × mode (``compile_cases()``) compiles for sm_80 and
sm_90 with zero spills, fitting shared memory, on the tensor cores. ``pytest -s``
prints registers and shared memory per build.
"""
import math

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

import svdkernels  # noqa: E402
from svdkernels.backends import triton_interpreted  # noqa: E402
from svdkernels.ops.lowrank_attention import dense_attention  # noqa: E402
from svdkernels.reference import lowrank_attention as ref  # noqa: E402
from svdkernels.triton import lowrank_attention as tk  # noqa: E402

RUNS = torch.cuda.is_available() or triton_interpreted()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(not RUNS, reason="needs CUDA or TRITON_INTERPRET=1")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (atol = rtol) for out, and for lse, against the reference on the same inputs.
TOL = {
    # 3xTF32 (~21 bits per product on the GPU; the interpreter computes in float32).
    "fp32": (2e-5, 2e-5),
    # The kernel rounds the reconstructed keys and the probabilities to 16 bits before
    # their dots (the reference keeps both in float32): a few units of 2^-9 / 2^-11 in
    # scores of size ~3, plus out's own rounding to bfloat16 / float16.
    "bf16": (3e-2, 2e-2),
    "fp16": (5e-3, 3e-3),
}

# Several tiles along every loop at the test sizes (not one of CONFIGS).
SMALL = tk.Config("small", 16, BLOCK_T=16, BLOCK_M=16, BLOCK_D=16, BLOCK_R=16, BLOCK_RV=16, num_warps=4)


def problem(B=2, Hq=4, Hkv=2, Sq=1, T=37, d=16, rk=20, rv=24, per_seq=False, dtype=torch.float32, seed=0):
    """``(q, k_latent, v_latent, k_basis, v_basis)`` with unit-scale keys and values."""
    g = torch.Generator().manual_seed(seed)
    lead = (B,) if per_seq else ()

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)

    return (randn(B, Hq, Sq, d), randn(B, T, rk), randn(B, T, rv),
            randn(*lead, rk, Hkv * d, scale=rk**-0.5), randn(*lead, rv, Hkv * d, scale=rv**-0.5))


def both(tensors, *, seqlens=None, **kw):
    """``(out, lse)`` of the op on the triton backend and on the reference backend."""
    if seqlens is not None:
        kw["cache_seqlens"] = torch.tensor(seqlens, device=DEVICE)
    results = []
    for backend in ("triton", "reference"):
        with svdkernels.use_backend(backend):
            results.append(svdkernels.lowrank_attention(*tensors, return_lse=True, **kw))
    return results


def assert_matches(got, want, dtype_name):
    (out, lse), (out_ref, lse_ref) = got, want
    tol_out, tol_lse = TOL[dtype_name]
    assert out.dtype == out_ref.dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), out_ref.float(), atol=tol_out, rtol=tol_out)
    torch.testing.assert_close(lse, lse_ref.float(), atol=tol_lse, rtol=tol_lse)  # -inf rows equal


NEOX, INTERLEAVED = svdkernels.RoPE(), svdkernels.RoPE(theta=500000.0, scaling=4.0, layout="interleaved")
PARTIAL = svdkernels.RoPE(layout="neox", rotary_dim=8)

# (id, problem kwargs, op kwargs)
CASES = [
    ("decode-neox", dict(Sq=1, T=37), dict(rope=NEOX, seqlens=[37, 0])),
    ("decode-interleaved-gqa4-T130", dict(Hkv=1, T=130, d=32, rk=48, rv=40), dict(rope=INTERLEAVED)),
    ("decode-partial-rotary-T1", dict(T=1, d=16), dict(rope=PARTIAL)),
    ("prefill-neox-ragged", dict(Sq=5, T=37, per_seq=True), dict(rope=NEOX, seqlens=[3, 30])),
    ("prefill-interleaved-noncausal", dict(Sq=5, T=37, Hkv=1), dict(rope=INTERLEAVED, causal=False)),
    ("absorbed-decode-perseq", dict(Sq=1, T=130, per_seq=True), dict(seqlens=[0, 77])),
    ("absorbed-prefill", dict(Sq=5, T=37, rk=48, rv=16), dict(seqlens=[37, 4])),
]


@needs_kernels
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fp32_against_reference(case):
    _, shape, kw = case
    assert_matches(*both(problem(**shape), **kw), "fp32")


@needs_kernels
@pytest.mark.parametrize("dtype_name", ["bf16", "fp16"])
@pytest.mark.parametrize("mode", ["rope-prefill", "absorbed-decode"])
def test_16bit_against_reference(dtype_name, mode):
    if mode == "rope-prefill":
        tensors = problem(Sq=5, T=37, dtype=DTYPES[dtype_name])
        kw = dict(rope=NEOX, seqlens=[37, 2])
    else:
        tensors = problem(Sq=1, T=70, Hkv=1, per_seq=True, dtype=DTYPES[dtype_name])
        kw = dict(seqlens=[70, 41])
    assert_matches(*both(tensors, **kw), dtype_name)


def _direct(tensors, seqlens, rope, causal, **kw):
    """The backend function itself (the reference's signature), sm_scale 0.3."""
    d = tensors[0].shape[-1]
    rope_args = rope.op_args(d) if rope is not None else (False, 10000.0, 1.0, 0, 0)
    sl = torch.tensor(seqlens, device=DEVICE) if seqlens is not None else None
    fn = kw.pop("fn", tk.lowrank_attention)
    return fn(*tensors, sl, causal, 0.3, *rope_args, **kw)


@needs_kernels
@pytest.mark.parametrize("absorb,rope", [(True, None), (False, None), (False, NEOX), (False, PARTIAL)],
                         ids=["absorbed", "reconstruct-norope", "neox", "partial"])
def test_small_tiles_and_splits(absorb, rope):
    # Every loop spans several tiles: T = 37 (3 key tiles), d = 48 / rk = 40 (3 feature
    # and rank chunks), g·Sq = 20 rows (2 row blocks), rv = 36 (3 rv blocks), 3 splits.
    tensors = problem(B=2, Hq=4, Hkv=1, Sq=5, T=37, d=48, rk=40, rv=36, per_seq=True)
    for causal in (True, False):
        got = _direct(tensors, [37, 9], rope, causal, absorb=absorb, config=SMALL, num_splits=3)
        want = _direct(tensors, [37, 9], rope, causal, absorb=absorb, fn=ref.lowrank_attention)
        assert_matches(got, want, "fp32")


@needs_kernels
def test_full_rank_equals_dense_attention():
    # rk = rv = Hkv·d with identity bases: the latents are the dense keys and values.
    B, Hq, Hkv, Sq, T, d = 2, 4, 2, 3, 37, 16
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, Hq, Sq, d, generator=g).to(DEVICE)
    K, V = (torch.randn(B, T, Hkv * d, generator=g).to(DEVICE) for _ in range(2))
    eye = torch.eye(Hkv * d, device=DEVICE)
    heads = lambda x: x.view(B, T, Hkv, d).transpose(1, 2)  # noqa: E731
    for rope in (NEOX, None):
        with svdkernels.use_backend("triton"):
            out, lse = svdkernels.lowrank_attention(q, K, V, eye, eye, rope=rope, return_lse=True)
        out_d, lse_d = dense_attention(q, heads(K), heads(V), rope=rope)
        torch.testing.assert_close(out, out_d, atol=2e-5, rtol=2e-5)  # float32 rounding only
        torch.testing.assert_close(lse, lse_d, atol=2e-5, rtol=2e-5)


@needs_kernels
def test_no_visible_key_gives_zero_and_minus_inf():
    with svdkernels.use_backend("triton"):
        out, lse = svdkernels.lowrank_attention(*problem(Sq=5), cache_seqlens=torch.tensor([0, 3], device=DEVICE),
                                                rope=NEOX, return_lse=True)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == -math.inf)
    # L = 3 < Sq = 5: bottom-right alignment leaves the first two queries without keys.
    assert torch.all(lse[1, :, :2] == -math.inf) and torch.isfinite(lse[1, :, 2:]).all()


@needs_kernels
def test_deterministic():
    tensors = problem(Sq=5, T=70)
    runs = [_direct(tensors, [70, 33], NEOX, True, config=SMALL, num_splits=3) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@needs_kernels
def test_garbage_past_seqlens_is_never_read():
    q, Ck, Cv, Wk, Wv = problem(T=37)
    sl = [20, 37]
    clean = _direct((q, Ck, Cv, Wk, Wv), sl, NEOX, True, config=SMALL)
    Ck, Cv = Ck.clone(), Cv.clone()
    Ck[0, 20:], Cv[0, 20:] = math.nan, math.inf
    dirty = _direct((q, Ck, Cv, Wk, Wv), sl, NEOX, True, config=SMALL)
    assert all(torch.equal(a, b) for a, b in zip(clean, dirty))


@needs_kernels
def test_float64_forced_is_an_error():
    with svdkernels.use_backend("triton"), pytest.raises(RuntimeError, match="float64"):
        svdkernels.lowrank_attention(*problem(dtype=torch.float64))


def test_pick_config():
    for dtype in DTYPES.values():
        assert tk.pick_config(4, dtype).name == "decode"  # a GQA group of 4 heads, one query
        assert tk.pick_config(16, dtype).name == "decode"
        assert tk.pick_config(4 * 5, dtype).name == "prefill"
    assert tk.pick_config(4, torch.float32).BLOCK_T < tk.pick_config(4, torch.bfloat16).BLOCK_T


@needs_kernels
def test_opcheck_on_the_triton_backend():
    # The op's contract (schema, fake tensors, dispatch under AOT) holds with the kernel behind it.
    q, Ck, Cv, Wk, Wv = problem(Sq=2, T=20)
    args = (q, Ck, Cv, Wk, Wv, torch.tensor([20, 7], device=DEVICE), True, 0.25,
            *svdkernels.RoPE().op_args(q.shape[-1]))
    with svdkernels.use_backend("triton"):
        torch.library.opcheck(torch.ops.svdkernels.lowrank_attention.default, args)


# ------------------------------------------- compile cases (built by tests/triton/test_compile.py)


COMPILE_CASES = list(tk.compile_cases())


def test_compile_cases_cover_every_config_dtype_and_mode():
    ids = {case.id for case in COMPILE_CASES}
    assert len(ids) == len(COMPILE_CASES)
    for dtype in ("bf16", "fp16", "fp32"):
        family = "fp32" if dtype == "fp32" else "16bit"
        for cfg in tk.CONFIGS[family]:
            for mode in ("rope", "absorbed"):
                assert f"split-{cfg.name}-{dtype}-{mode}" in ids
