"""lowrank_attention: against dense SDPA on reconstructed keys, RoPE, GQA, masks, lse, contract."""
import math

import pytest
import torch
import torch.nn.functional as F

import svdkernels
from svdkernels.ops.lowrank_attention import dense_attention
from svdkernels.reference import lowrank_attention as ref
from svdkernels.testing.errors import assert_raises_naming

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def rope_oracle(x: torch.Tensor, positions: torch.Tensor, rope: svdkernels.RoPE) -> torch.Tensor:
    """RoPE as complex multiplication in float64, pair (a, b) -> (a + ib)·e^{iθ}, with the
    op's angle convention: θ = pos · (θ_base^(-2i/r) / scaling), formed in float32 (as Hugging Face does)."""
    d = x.shape[-1]
    r = rope.rotary_dim or d
    if rope.layout == "neox":
        a, b = x[..., : r // 2], x[..., r // 2 : r]
    else:
        a, b = x[..., 0:r:2], x[..., 1:r:2]
    freq = 1.0 / rope.theta ** (torch.arange(0, r, 2).float() / r) / rope.scaling
    angle = (positions.float().unsqueeze(-1) * freq).double()
    z = torch.complex(a.double(), b.double()) * torch.polar(torch.ones_like(angle), angle)
    if rope.layout == "neox":
        rot = torch.cat([z.real, z.imag], dim=-1)
    else:
        rot = torch.stack([z.real, z.imag], dim=-1).flatten(-2)
    return torch.cat([rot, x[..., r:].double()], dim=-1)


def heads(x: torch.Tensor, d: int) -> torch.Tensor:
    """[B, T, H*d] -> [B, H, T, d]."""
    B, T, n = x.shape
    return x.reshape(B, T, n // d, d).transpose(1, 2)


def oracle(q, Ck, Cv, Wk, Wv, *, seqlens=None, rope=None, causal=True, scale=None):
    """float64 keys and values reconstructed, RoPE applied, then SDPA; lse from the scores."""
    B, Hq, Sq, d = q.shape
    T = Ck.shape[1]
    K = heads(Ck.double() @ Wk.double(), d)
    V = heads(Cv.double() @ Wv.double(), d)
    if rope is not None:
        K = rope_oracle(K, torch.arange(T), rope)
    L = torch.full((B,), T) if seqlens is None else seqlens.long()
    t = torch.arange(T)
    mask = (t < L.view(B, 1, 1)).expand(B, Sq, T)
    if causal:
        mask = mask & (t <= L.view(B, 1, 1) - Sq + torch.arange(Sq).view(1, Sq, 1))
    mask = mask.unsqueeze(1)
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = F.scaled_dot_product_attention(q.double(), K, V, attn_mask=mask, scale=scale, enable_gqa=True)
    Kr = K.repeat_interleave(Hq // K.shape[1], dim=1)
    lse = torch.logsumexp((q.double() @ Kr.transpose(-1, -2) * scale).masked_fill(~mask, -math.inf), dim=-1)
    return out, lse


def problem(B=2, Hq=4, Hkv=2, Sq=3, T=11, d=8, rk=5, rv=6, per_seq=False, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = Hkv * d
    lead = (B,) if per_seq else ()
    return (
        torch.randn(B, Hq, Sq, d, generator=g, dtype=dtype),
        torch.randn(B, T, rk, generator=g, dtype=dtype),
        torch.randn(B, T, rv, generator=g, dtype=dtype),
        (torch.randn(*lead, rk, n, generator=g, dtype=dtype) / math.sqrt(rk)),
        (torch.randn(*lead, rv, n, generator=g, dtype=dtype) / math.sqrt(rv)),
    )


ROPES = {
    "norope": None,
    "neox": svdkernels.RoPE(theta=100.0),
    "interleaved": svdkernels.RoPE(theta=500.0, scaling=2.0, layout="interleaved"),
    "partial": svdkernels.RoPE(theta=10000.0, rotary_dim=4),
}
# (B, Hq, Hkv, Sq, T, d, rk, rv): decode, prefill with Sq = T, Sq < T, MHA, GQA x4, batch 1, odd sizes.
SHAPES = [
    (2, 4, 2, 1, 13, 8, 5, 6),
    (1, 8, 2, 7, 7, 16, 9, 3),
    (3, 6, 3, 4, 10, 8, 12, 7),
    (2, 4, 4, 2, 9, 6, 1, 5),
]


def shape_id(s):
    return "B{}-Hq{}-Hkv{}-Sq{}-T{}-d{}-rk{}-rv{}".format(*s)


@pytest.mark.parametrize("per_seq", [False, True], ids=["shared-basis", "per-seq-basis"])
@pytest.mark.parametrize("rope", list(ROPES), ids=list(ROPES))
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_dense_sdpa_on_reconstructed_keys(shape, rope, per_seq):
    B, Hq, Hkv, Sq, T, d, rk, rv = shape
    q, Ck, Cv, Wk, Wv = problem(B, Hq, Hkv, Sq, T, d, rk, rv, per_seq=per_seq)
    out, lse = svdkernels.lowrank_attention(q, Ck, Cv, Wk, Wv, rope=ROPES[rope], return_lse=True)
    want, want_lse = oracle(q, Ck, Cv, Wk, Wv, rope=ROPES[rope])
    assert out.shape == (B, Hq, Sq, d) and lse.shape == (B, Hq, Sq) and lse.dtype == F64
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rope", ["norope", "neox"])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_full_rank_equals_dense_attention(rope, dtype):
    # Keys and values factored exactly (SVD at full rank): the op is dense attention.
    B, Hq, Hkv, Sq, T, d = 2, 8, 2, 3, 40, 8
    g = torch.Generator().manual_seed(1)
    K, V = torch.randn(B, T, Hkv * d, generator=g, dtype=F64), torch.randn(B, T, Hkv * d, generator=g, dtype=F64)
    q = torch.randn(B, Hq, Sq, d, generator=g, dtype=F64)
    (Uk, Sk, Vhk), (Uv, Sv, Vhv) = torch.linalg.svd(K, full_matrices=False), torch.linalg.svd(V, full_matrices=False)
    args = [t.to(dtype) for t in (q, Uk * Sk.unsqueeze(1), Uv * Sv.unsqueeze(1), Vhk, Vhv)]
    out = svdkernels.lowrank_attention(*args, rope=ROPES[rope])
    Kh = heads(K, d) if ROPES[rope] is None else rope_oracle(heads(K, d), torch.arange(T), ROPES[rope])
    want = F.scaled_dot_product_attention(q, Kh, heads(V, d), is_causal=False,
                                          attn_mask=torch.ones(Sq, T, dtype=torch.bool).tril(T - Sq),
                                          enable_gqa=True)
    tol = 1e-10 if dtype == F64 else 2e-5  # fp32: rounding of the factors and the products
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)


def test_causal_is_bottom_right_and_decode_is_the_last_prefill_row():
    q, Ck, Cv, Wk, Wv = problem(Sq=5, T=9)
    rope = ROPES["neox"]
    prefill = svdkernels.lowrank_attention(q, Ck, Cv, Wk, Wv, rope=rope)
    decode = svdkernels.lowrank_attention(q[:, :, -1:], Ck, Cv, Wk, Wv, rope=rope)
    torch.testing.assert_close(decode, prefill[:, :, -1:], rtol=1e-12, atol=1e-12)
    # Query i of 5 over 9 keys sees keys 0..4+i: the first query equals attention over 5 keys.
    first = svdkernels.lowrank_attention(q[:, :, :1], Ck[:, :5], Cv[:, :5], Wk, Wv, rope=rope, causal=False)
    torch.testing.assert_close(first, prefill[:, :, :1], rtol=1e-12, atol=1e-12)
    non_causal, _ = oracle(q, Ck, Cv, Wk, Wv, rope=rope, causal=False)
    torch.testing.assert_close(svdkernels.lowrank_attention(q, Ck, Cv, Wk, Wv, rope=rope, causal=False), non_causal)


@pytest.mark.parametrize("rope", ["norope", "interleaved"])
@pytest.mark.parametrize("causal", [True, False])
def test_ragged_cache_seqlens(rope, causal):
    B, Hq, Hkv, Sq, T = 3, 4, 2, 2, 12
    q, Ck, Cv, Wk, Wv = problem(B, Hq, Hkv, Sq, T, per_seq=True)
    seqlens = torch.tensor([12, 5, 2], dtype=torch.int32)
    # Past each length the latents hold garbage, NaN included: it must never be read.
    for t, L in enumerate(seqlens.tolist()):
        Ck[t, L:], Cv[t, L:] = math.nan, math.inf
    out, lse = svdkernels.lowrank_attention(q, Ck, Cv, Wk, Wv, cache_seqlens=seqlens, rope=ROPES[rope],
                                            causal=causal, return_lse=True)
    assert torch.isfinite(out).all()
    for b, L in enumerate(seqlens.tolist()):
        want, want_lse = oracle(q[b:b + 1], Ck[b:b + 1, :L], Cv[b:b + 1, :L], Wk[b], Wv[b], rope=ROPES[rope],
                                causal=causal)
        torch.testing.assert_close(out[b:b + 1], want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse[b:b + 1], want_lse, rtol=1e-10, atol=1e-10)


def test_a_query_that_sees_no_key_gives_zero_and_minus_inf():
    q, Ck, Cv, Wk, Wv = problem(B=2, Sq=3, T=6)
    # Length 0; and length 1 with 3 causal queries: queries 0 and 1 see nothing.
    out, lse = svdkernels.lowrank_attention(q, Ck, Cv, Wk, Wv, cache_seqlens=torch.tensor([0, 1]), return_lse=True)
    assert (out[0] == 0).all() and (lse[0] == -math.inf).all()
    assert (out[1, :, :2] == 0).all() and (lse[1, :, :2] == -math.inf).all()
    assert torch.isfinite(lse[1, :, 2]).all()
    empty = svdkernels.lowrank_attention(q, Ck[:, :0], Cv[:, :0], Wk, Wv, causal=False)
    assert (empty == 0).all()


@pytest.mark.parametrize("rope", ["norope", "neox"])
def test_lse_merges_two_halves_into_the_whole(rope):
    q, Ck, Cv, Wk, Wv = problem(Sq=2, T=14)
    r = ROPES[rope]
    whole, whole_lse = svdkernels.lowrank_attention(q, Ck, Cv, Wk, Wv, rope=r, causal=False, return_lse=True)
    # The second half sits at positions 6.., which the op would put at 0..: rotate through dense_attention.
    o1, l1 = svdkernels.lowrank_attention(q, Ck[:, :6], Cv[:, :6], Wk, Wv, rope=r, causal=False, return_lse=True)
    K2, V2 = heads(Ck[:, 6:] @ Wk, 8), heads(Cv[:, 6:] @ Wv, 8)
    o2, l2 = dense_attention(q, K2, V2, rope=r, k_start=6, causal=False)
    out, lse = svdkernels.merge_attention(o1, l1, o2, l2)
    torch.testing.assert_close(out, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, whole_lse, rtol=1e-12, atol=1e-12)
    # Merging with an empty part (lse = -inf) changes nothing; two empty parts give 0 and -inf.
    none = torch.full_like(l1, -math.inf)
    out, lse = svdkernels.merge_attention(o1, l1, torch.zeros_like(o1), none)
    torch.testing.assert_close(out, o1)
    torch.testing.assert_close(lse, l1)
    out, lse = svdkernels.merge_attention(o1, none, o2, none)
    assert (out == 0).all() and (lse == -math.inf).all()


@pytest.mark.parametrize("rope", ["norope", "neox"])
def test_with_tail_is_causal_attention_over_prefix_then_tail(rope):
    B, Hq, Hkv, d, T, S, Sq = 2, 4, 2, 8, 10, 4, 3
    q, Ck, Cv, Wk, Wv = problem(B, Hq, Hkv, Sq, T, d, per_seq=True)
    seqlens = torch.tensor([10, 7])
    g = torch.Generator().manual_seed(3)
    K_tail, V_tail = (torch.randn(B, Hkv, S, d, generator=g, dtype=F64) for _ in range(2))
    r = ROPES[rope]
    out = svdkernels.lowrank_attention_with_tail(q, Ck, Cv, Wk, Wv, K_tail, V_tail, cache_seqlens=seqlens, rope=r)
    for b, L in enumerate(seqlens.tolist()):
        # Dense oracle: the whole sequence's pre-RoPE keys, latents first, queries the last Sq.
        K = torch.cat([heads(Ck[b:b + 1, :L] @ Wk[b], d), K_tail[b:b + 1]], dim=2)
        V = torch.cat([heads(Cv[b:b + 1, :L] @ Wv[b], d), V_tail[b:b + 1]], dim=2)
        if r is not None:
            K = rope_oracle(K, torch.arange(L + S), r)
        mask = torch.ones(Sq, L + S, dtype=torch.bool).tril(L + S - Sq)
        want = F.scaled_dot_product_attention(q[b:b + 1], K, V, attn_mask=mask, enable_gqa=True)
        torch.testing.assert_close(out[b:b + 1], want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rope", ["norope", "interleaved"])
def test_key_tiles_match_the_oracle(monkeypatch, rope):
    # Keys are reconstructed in tiles of 16 tokens here; 50 keys: three full tiles and a partial one.
    monkeypatch.setattr(ref, "_TILE_ELEMENTS", 16 * 16)
    q, Ck, Cv, Wk, Wv = problem(Sq=20, T=50, d=8, rk=30, per_seq=True)
    assert not ref.absorb_is_cheaper(4, 20, 2, 8, 30)  # so the no-RoPE case reconstructs too
    out, lse = svdkernels.lowrank_attention(q, Ck, Cv, Wk, Wv, rope=ROPES[rope], cache_seqlens=torch.tensor([50, 37]),
                                            return_lse=True)
    want, want_lse = oracle(q, Ck, Cv, Wk, Wv, rope=ROPES[rope], seqlens=torch.tensor([50, 37]))
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("Sq", [1, 6])
def test_absorbed_equals_reconstructed(Sq):
    q, Ck, Cv, Wk, Wv = problem(B=2, Hq=8, Hkv=2, Sq=Sq, T=15, d=16, rk=4, rv=5)
    args = (q, Ck, Cv, Wk, Wv, torch.tensor([15, 9]), True, 0.3, False, 1e4, 1.0, 0, 0)
    absorbed = ref.lowrank_attention(*args, absorb=True)
    rebuilt = ref.lowrank_attention(*args, absorb=False)
    for a, b in zip(absorbed, rebuilt):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # The op picks absorption for decode (cheaper) and reconstruction for long chunks.
    assert ref.absorb_is_cheaper(32, 1, 8, 128, 256) and not ref.absorb_is_cheaper(32, 128, 8, 128, 256)
    out = svdkernels.lowrank_attention(q, Ck, Cv, Wk, Wv, cache_seqlens=torch.tensor([15, 9]), sm_scale=0.3)
    torch.testing.assert_close(out, absorbed[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [
    (torch.float32, 1e-5),   # float32 inputs, float32 accumulation
    (torch.bfloat16, 3e-2),  # inputs rounded to 8-bit mantissas; accumulation is float32
    (torch.float16, 5e-3),   # 11-bit mantissas
])
@pytest.mark.parametrize("rope", ["norope", "neox"])
def test_low_precision_against_float64(dtype, tol, rope):
    q, Ck, Cv, Wk, Wv = problem(Hq=8, Hkv=2, Sq=2, T=64, d=32, rk=16, rv=16)
    low = [t.to(dtype) for t in (q, Ck, Cv, Wk, Wv)]
    out, lse = svdkernels.lowrank_attention(*low, rope=ROPES[rope], return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    want, _ = oracle(*[t.double() for t in low], rope=ROPES[rope])
    err = (out.double() - want).norm() / want.norm()
    assert err < tol, err


def test_inference_only():
    q, Ck, Cv, Wk, Wv = problem()
    out = svdkernels.lowrank_attention(q.requires_grad_(), Ck, Cv, Wk, Wv)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        out.sum().backward()


def test_forcing_triton_for_float64_is_an_error():
    # The kernels compute in fp32/fp16/bf16: a forced backend never falls back silently.
    q, Ck, Cv, Wk, Wv = problem()
    assert q.dtype == torch.float64
    with svdkernels.use_backend("triton"), pytest.raises(RuntimeError, match="triton"):
        svdkernels.lowrank_attention(q, Ck, Cv, Wk, Wv)


def _bad(**changes):
    kw = dict(zip(("q", "k_latent", "v_latent", "k_basis", "v_basis"), problem(dtype=torch.float32)))
    extra = {k: changes.pop(k) for k in list(changes) if k not in kw}
    kw.update(changes)
    return lambda: svdkernels.lowrank_attention(*kw.values(), **extra)


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (_bad(k_basis=torch.randn(5, 24), v_basis=torch.randn(6, 24)), ValueError,
         ["q", "multiple of Hkv = 3", "Hq = 4"]),
        (_bad(k_basis=torch.randn(5, 20)), ValueError, ["k_basis", "multiple of d = 8", "20"]),
        (_bad(k_basis=torch.randn(4, 16)), ValueError, ["k_basis", "rk = 5", "k_latent", "(4, 16)"]),
        (_bad(v_basis=torch.randn(5, 16)), ValueError, ["v_basis", "rv = 6", "(5, 16)"]),
        (_bad(v_basis=torch.randn(6, 24)), ValueError, ["v_basis", "Hkv*d = 16", "24"]),
        (_bad(k_basis=torch.randn(3, 5, 16)), ValueError, ["k_basis", "B = 2", "(3, 5, 16)"]),
        (_bad(v_latent=torch.randn(2, 10, 6)), ValueError, ["v_latent", "T = 11", "(2, 10, 6)"]),
        (_bad(k_latent=torch.randn(3, 11, 5)), ValueError, ["k_latent", "B = 2", "(3, 11, 5)"]),
        (_bad(q=torch.randn(2, 4, 8)), ValueError, ["q", "4-D", "(2, 4, 8)"]),
        (_bad(q=torch.ones(2, 4, 3, 8, dtype=torch.int64)), TypeError, ["q", "torch.int64"]),
        (_bad(k_latent=torch.randn(2, 11, 5, dtype=F64)), TypeError, ["k_latent", "torch.float32", "torch.float64"]),
        (_bad(v_basis=torch.randn(6, 16, dtype=torch.bfloat16)), TypeError, ["v_basis", "torch.float32", "bfloat16"]),
        (_bad(k_basis=torch.randn(5, 16, device="meta")), ValueError, ["k_basis", "device cpu", "meta"]),
        (_bad(cache_seqlens=torch.tensor([11, 12])), ValueError, ["cache_seqlens", "[0, 11]", "max 12"]),
        (_bad(cache_seqlens=torch.tensor([-1, 3])), ValueError, ["cache_seqlens", "min -1"]),
        (_bad(cache_seqlens=torch.tensor([1.0, 2.0])), TypeError, ["cache_seqlens", "int32", "torch.float32"]),
        (_bad(cache_seqlens=torch.tensor([1, 2, 3])), ValueError, ["cache_seqlens", "[2]", "(3,)"]),
        (_bad(rope="neox"), TypeError, ["rope", "svdkernels.RoPE", "str"]),
        (_bad(rope=svdkernels.RoPE(rotary_dim=10)), ValueError, ["rope.rotary_dim", "d = 8", "10"]),
        (lambda: svdkernels.RoPE(layout="gptj"), ValueError, ["rope.layout", "interleaved", "gptj"]),
        (lambda: svdkernels.RoPE(theta=-1.0), ValueError, ["rope.theta", "> 0", "-1.0"]),
        (lambda: svdkernels.RoPE(rotary_dim=3), ValueError, ["rope.rotary_dim", "even", "3"]),
        (_bad(sm_scale=0.0), ValueError, ["sm_scale", "> 0", "0.0"]),
        (lambda: svdkernels.merge_attention(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3), torch.zeros(1, 2, 3, 4),
                                            torch.zeros(1, 2)), ValueError, ["lse2", "[1, 2, 3]", "(1, 2)"]),
        (lambda: svdkernels.lowrank_attention_with_tail(*problem(), torch.randn(2, 1, 4, 8, dtype=F64),
                                                        torch.randn(2, 1, 4, 8, dtype=F64)),
         ValueError, ["k_tail", "Hkv = 2", "(2, 1, 4, 8)"]),
    ],
    ids=["heads-dont-divide", "width-not-multiple-of-d", "rk-mismatch", "rv-mismatch", "v-width", "basis-batch",
         "v-latent-T", "latent-batch", "q-3d", "int-q", "dtype-mismatch", "basis-dtype", "device-mismatch",
         "seqlens-beyond-T", "seqlens-negative", "seqlens-float", "seqlens-shape", "rope-type", "rotary-dim",
         "rope-layout", "rope-theta", "rotary-odd", "sm-scale", "merge-lse-shape", "tail-heads"],
)
def test_bad_input_names_the_argument(call, exc, words):
    assert_raises_naming(call, exc, words)


@pytest.mark.parametrize("rope", ["norope", "interleaved"])
@pytest.mark.parametrize("seqlens", [False, True], ids=["full", "ragged"])
def test_opcheck(rope, seqlens):
    q, Ck, Cv, Wk, Wv = problem(dtype=torch.float32, per_seq=seqlens)
    sl = torch.tensor([11, 4], dtype=torch.int32) if seqlens else None
    rope_args = svdkernels.ops.lowrank_attention._rope_args(ROPES[rope], 8)
    torch.library.opcheck(torch.ops.svdkernels.lowrank_attention.default,
                          (q, Ck, Cv, Wk, Wv, sl, True, 0.35, *rope_args))


def test_torch_compile_fullgraph():
    q, Ck, Cv, Wk, Wv = problem(dtype=torch.float32)
    rope = ROPES["neox"]

    def f(q, Ck, Cv, Wk, Wv, seqlens):
        out, lse = svdkernels.lowrank_attention(q, Ck, Cv, Wk, Wv, cache_seqlens=seqlens, rope=rope,
                                                return_lse=True)
        return torch.nn.functional.silu(out).sum(-1) + lse

    seqlens = torch.tensor([11, 6])
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(q, Ck, Cv, Wk, Wv, seqlens), f(q, Ck, Cv, Wk, Wv, seqlens))
