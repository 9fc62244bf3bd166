"""The C++ CPU kernels of the W4A4 pair (csrc/cpu/lowrank_w4a4.cpp), every path this
CPU runs (portable C++, AVX2), against the reference backend: the quantiser's xq and
xscale bit-identical to the reference, its down projection to float32 rounding; the
GEMM's integer group sums bit-identical (one group at a time), its output
bit-identical without low-rank branch and bias, and within float32 rounding with
them; signed and unsigned activations, float32/bfloat16/float16, 1 to 16 tokens,
group counts that are not multiples of the kernel's block of 8; determinism; the
internal ops' contract and the public ops' dispatch.

Skipped when svdkernels._C is not built, unless SVDKERNELS_REQUIRE_EXTENSION=1.
"""

import pytest
import torch

import svdkernels
from svdkernels.backends import select_backend
from svdkernels.formats.int4 import unpack_int4
from svdkernels.quant import lowrank_quantize_act, lowrank_w4a4_gemm, quantize_weight
from svdkernels.reference import lowrank_quant as reference

from cpp_support import ISA_NAMES, isas, require_extension  # noqa: E402 (tests/cpp on sys.path)

require_extension()

QUANT = torch.ops.svdkernels._cpp_lowrank_quantize_act.default
GEMM = torch.ops.svdkernels._cpp_lowrank_w4a4_gemm.default
ISAS = isas()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def layer(M, N, K, r, dtype, unsigned, seed=0):
    """Activations, smoothing factors and a quantised layer with its low-rank branch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.rand(K, generator=g).add(0.1) * 4  # uneven channels
    if unsigned:
        x = x.clamp(min=-0.171875)
    smooth = torch.rand(K, generator=g) + 0.5
    qweight, scales = quantize_weight(torch.randn(N, K, generator=g), dtype=dtype)
    L_down = (torch.randn(r, K, generator=g) / K**0.5).to(dtype)
    L_up = torch.randn(N, r, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    return x.to(dtype), smooth, qweight, scales, L_down, L_up, bias


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES.get)
@pytest.mark.parametrize("unsigned", [False, True], ids=["signed", "unsigned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,K,r", [(1, 37, 192, 16), (16, 24, 640, 32), (5, 130, 512, 0), (3, 9, 64, 16)],
                         ids=str)
def test_pair_against_reference(isa, unsigned, dtype, M, N, K, r):
    x, smooth, qweight, scales, L_down, L_up, bias = layer(M, N, K, r, dtype, unsigned, seed=M + K)
    xq, xs, act = QUANT(x, smooth, L_down, unsigned, isa)
    rq, rs, ract = reference.lowrank_quantize_act(x, smooth, L_down, unsigned)
    assert torch.equal(xq, rq) and torch.equal(xs, rs)
    # Down projection: float32 dots of length K (x and L_down exact in float32).
    torch.testing.assert_close(act, ract, rtol=1e-5, atol=1e-5 * K**0.5)
    # Without the branch and bias the GEMM is the reference's float32 sequence.
    none = act[:, :0], L_up[:, :0].contiguous()
    assert torch.equal(GEMM(rq, rs, qweight, scales, *none, None, unsigned, isa),
                       reference.lowrank_w4a4_gemm(rq, rs, qweight, scales, *none, None, unsigned))
    y = GEMM(rq, rs, qweight, scales, ract, L_up, bias, unsigned, isa)
    y_ref = reference.lowrank_w4a4_gemm(rq, rs, qweight, scales, ract, L_up, bias, unsigned)
    assert y.dtype == dtype and y.shape == (M, N)
    tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]  # one rounding to dtype
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=tol, atol=tol * float(y_ref.abs().max()))


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES.get)
@pytest.mark.parametrize("unsigned", [False, True], ids=["signed", "unsigned"])
def test_integer_group_sums_exact(isa, unsigned):
    # Every byte value in both operands (all 16 nibbles, -8 included, in every
    # position); unit scales on one group at a time make y that group's integer sum.
    M, N, K = 3, 11, 64 * 11  # 11 groups: a whole block of 8 and a tail of 3
    G = K // 64
    xq = torch.arange(M * K // 2).mul(7).remainder(256).to(torch.uint8).reshape(M, K // 2)
    qweight = torch.arange(N * K // 2).mul(13).add(5).remainder(256).to(torch.uint8).reshape(N, K // 2)
    qx = unpack_int4(xq, signed=not unsigned).long().reshape(M, G, 64)
    qw = unpack_int4(qweight).long().reshape(N, G, 64)
    exact = torch.einsum("mgk,ngk->gmn", qx, qw)  # [G, M, N] int64
    scales = torch.ones(N, G)
    none = torch.zeros(M, 0), torch.zeros(N, 0)
    for g in range(G):
        xs = torch.zeros(M, G)
        xs[:, g] = 1
        y = GEMM(xq, xs, qweight, scales, *none, None, unsigned, isa)
        assert torch.equal(y, exact[g].float()), g
        assert torch.equal(y, reference.lowrank_w4a4_gemm(xq, xs, qweight, scales, *none, None, unsigned))


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES.get)
def test_tokens_1_to_16_and_determinism(isa):
    x, smooth, qweight, scales, L_down, L_up, bias = layer(16, 200, 1024, 32, torch.bfloat16, False)
    xq, xs, act = QUANT(x, smooth, L_down, False, isa)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = GEMM(xq, xs, qweight, scales, act, L_up, bias, False, isa)
    finally:
        torch.set_num_threads(threads)
    many = GEMM(xq, xs, qweight, scales, act, L_up, bias, False, isa)
    assert torch.equal(one, many)
    for M in range(1, 17):  # every token tile size; a token's output ignores the others
        sub = GEMM(xq[16 - M:], xs[16 - M:], qweight, scales, act[16 - M:], L_up, bias, False, isa)
        assert torch.equal(sub, many[16 - M:]), M


def test_quantizer_edge_values():
    # Zero groups, NaN groups (NaN scale, zero codes, as the reference) and ties
    # that round half to even.
    K = 256
    x = torch.randn(4, K)
    x[0, :64] = 0
    x[1, 70] = float("nan")
    x[2, :64] = torch.arange(64) % 8 - 3.5  # absmax 4: every x/s is a tie at n + 0.5·(7/4)
    x[3, :64] = torch.tensor([7.0, 3.5, -3.5, 2.5, -2.5, 0.5, -0.5, 1.5] * 8)
    smooth = torch.ones(K)
    for isa in ISAS:
        for unsigned in (False, True):
            xq, xs, _ = QUANT(x, smooth, torch.zeros(0, K), unsigned, isa)
            rq, rs, _ = reference.lowrank_quantize_act(x, smooth, torch.zeros(0, K), unsigned)
            assert torch.equal(xq, rq)
            torch.testing.assert_close(xs, rs, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(xs[1, 1]) and (xq[1, 32:64] == 0).all()


def test_public_ops_dispatch(monkeypatch):
    monkeypatch.delenv("SVDKERNELS_BACKEND", raising=False)
    for op in ("lowrank_quantize_act", "lowrank_w4a4_gemm"):
        assert select_backend(op, torch.device("cpu"), has_cpp=True) == "cpp"
    x, smooth, qweight, scales, L_down, L_up, bias = layer(6, 48, 256, 16, torch.float32, False)
    x = x.reshape(2, 3, 256)
    xq, xs, act = lowrank_quantize_act(x, smooth, L_down)
    c = QUANT(x.reshape(6, 256), smooth, L_down, False, -1)
    assert torch.equal(xq, c[0].reshape(2, 3, 128)) and torch.equal(act, c[2].reshape(2, 3, 16))
    y = lowrank_w4a4_gemm(xq, xs, qweight, scales, lowrank_act=act, L_up=L_up, bias=bias)
    assert torch.equal(y, GEMM(c[0], c[1], qweight, scales, c[2], L_up, bias, False, -1).reshape(2, 3, 48))
    # Through the custom ops (what torch.compile and torch.ops users call) alike.
    assert torch.equal(torch.ops.svdkernels.lowrank_w4a4_gemm(xq, xs, qweight, scales, act, L_up, bias, False), y)
    with svdkernels.use_backend("reference"):
        y_ref = lowrank_w4a4_gemm(*lowrank_quantize_act(x, smooth, L_down)[:2], qweight, scales,
                                  lowrank_act=act, L_up=L_up, bias=bias)
    assert torch.equal(y_ref, reference.lowrank_w4a4_gemm(xq, xs, qweight, scales, act, L_up, bias, False))
    # No tokens, no rank.
    e = lowrank_quantize_act(torch.zeros(0, 256), smooth, L_down[:0])
    assert [t.shape for t in e] == [(0, 128), (0, 4), (0, 0)]
    assert lowrank_w4a4_gemm(*e[:2], qweight, scales, lowrank_act=e[2], L_up=L_up[:, :0]).shape == (0, 48)


def test_internal_op_errors():
    x, smooth, qweight, scales, L_down, L_up, bias = layer(2, 32, 128, 16, torch.float32, False)
    xq, xs, act = QUANT(x, smooth, L_down, False, -1)
    with pytest.raises(ValueError, match="isa: expected -1 \\(auto\\) or 0"):
        QUANT(x, smooth, L_down, False, 9)
    with pytest.raises(ValueError, match="smooth: expected shape \\[K\\]"):
        QUANT(x, smooth[:64], L_down, False, -1)
    with pytest.raises(TypeError, match="L_down: expected dtype Float \\(that of x\\)"):
        QUANT(x, smooth, L_down.bfloat16(), False, -1)
    with pytest.raises(ValueError, match="x: expected K a positive multiple of 64"):
        QUANT(torch.randn(2, 96), torch.ones(96), torch.zeros(0, 96), False, -1)
    with pytest.raises(TypeError, match="xscale: expected dtype float32"):
        GEMM(xq, xs.double(), qweight, scales, act, L_up, bias, False, -1)
    with pytest.raises(ValueError, match="qweight: expected shape \\[32, 64\\]"):
        GEMM(xq, xs, qweight[:, :32].contiguous(), scales, act, L_up, bias, False, -1)
    with pytest.raises(ValueError, match="lowrank_act: expected shape \\[M, r\\]"):
        GEMM(xq, xs, qweight, scales, act[:, :8], L_up, bias, False, -1)
    with pytest.raises(TypeError, match="bias: expected dtype Float \\(that of scales\\)"):
        GEMM(xq, xs, qweight, scales, act, L_up, bias.half(), False, -1)
    with pytest.raises(ValueError, match="L_up: expected a contiguous tensor"):
        GEMM(xq, xs, qweight, scales, act, L_up.T.contiguous().T, bias, False, -1)


def test_opcheck_internal_ops():
    x, smooth, qweight, scales, L_down, L_up, bias = layer(3, 24, 128, 16, torch.bfloat16, True)
    torch.library.opcheck(QUANT, (x, smooth, L_down, True, -1))
    xq, xs, act = QUANT(x, smooth, L_down, True, -1)
    torch.library.opcheck(GEMM, (xq, xs, qweight, scales, act, L_up, bias, True, -1))
    torch.library.opcheck(GEMM, (xq, xs, qweight, scales, act[:, :0], L_up[:, :0].contiguous(), None, True, 0))
