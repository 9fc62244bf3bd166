"""The fused C++ W4A4 layer op ``_cpp_lowrank_w4a4_linear`` (csrc/cpu/lowrank_w4a4.cpp)
on every path this CPU runs: bit-identical to ``_cpp_lowrank_quantize_act`` followed by
``_cpp_lowrank_w4a4_gemm`` (signed/unsigned, float32/bfloat16/float16, 0 to 64 tokens,
rank 0 and 32, with and without bias, K = 64/384/1536, NaN/inf activations); a token's
output independent of the call's other tokens across the GEMM's two AVX2 paths (row
tiles below 3 tokens, column tiles from 3) and of the thread count; the column path
against the portable one and the reference; bad arguments.

Skipped when svdkernels._C is not built, unless SVDKERNELS_REQUIRE_EXTENSION=1.
"""

import pytest
import torch

from svdkernels.reference import lowrank_quant as reference

from cpp_support import ISA_NAMES, isas, require_extension  # noqa: E402 (tests/cpp on sys.path)
from test_lowrank_w4a4_cpp import layer as pair_layer  # noqa: E402

require_extension()

QUANT = torch.ops.svdkernels._cpp_lowrank_quantize_act.default
GEMM = torch.ops.svdkernels._cpp_lowrank_w4a4_gemm.default
LINEAR = torch.ops.svdkernels._cpp_lowrank_w4a4_linear.default
ISAS = isas()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def layer(M, N, K, r, dtype, unsigned, seed=0):
    """The pair's test layer, in the fused op's argument order:
    x, smooth, L_down, qweight, scales, L_up, bias."""
    x, smooth, qweight, scales, L_down, L_up, bias = pair_layer(M, N, K, r, dtype, unsigned, seed)
    return x, smooth, L_down, qweight, scales, L_up, bias


def pair(x, smooth, L_down, qweight, scales, L_up, bias, unsigned, isa):
    xq, xs, act = QUANT(x, smooth, L_down, unsigned, isa)
    return GEMM(xq, xs, qweight, scales, act, L_up, bias, unsigned, isa)


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES.get)
@pytest.mark.parametrize("unsigned", [False, True], ids=["signed", "unsigned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_equals_the_pair(isa, unsigned, dtype):
    for K in (64, 384, 1536):
        x64, smooth, L_down32, qweight, scales, L_up32, bias = layer(64, 40, K, 32, dtype, unsigned, seed=K)
        for r in (0, 32):
            L_down, L_up = L_down32[:r], L_up32[:, :r].contiguous()
            for M in (0, 1, 2, 3, 5, 12, 17, 64):
                x = x64[64 - M:]  # different tokens at each M
                for b in (None, bias):
                    y = LINEAR(x, smooth, L_down, qweight, scales, L_up, b, unsigned, isa)
                    assert y.dtype == dtype and y.shape == (M, 40)
                    assert torch.equal(y, pair(x, smooth, L_down, qweight, scales, L_up, b, unsigned, isa)), (K, M, r)


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES.get)
@pytest.mark.parametrize("unsigned", [False, True], ids=["signed", "unsigned"])
def test_non_finite_activations_as_the_pair(isa, unsigned):
    # A NaN makes its group's scale NaN (codes 0); an inf makes the scale inf (the
    # other codes 0, inf/inf = NaN -> 0); both then spread through the output as
    # in the pair.
    x, smooth, L_down, qweight, scales, L_up, bias = layer(6, 24, 256, 16, torch.float32, unsigned)
    x[1, 3] = float("nan")
    x[2, 70] = float("inf")
    x[3, 130] = float("-inf")
    x[4, :] = float("nan")
    y = LINEAR(x, smooth, L_down, qweight, scales, L_up, bias, unsigned, isa)
    y_pair = pair(x, smooth, L_down, qweight, scales, L_up, bias, unsigned, isa)
    torch.testing.assert_close(y, y_pair, rtol=0, atol=0, equal_nan=True)
    assert torch.isfinite(y[[0, 5]]).all() and torch.isnan(y[4]).all()


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES.get)
def test_token_independent_of_the_batch_and_threads(isa):
    # The AVX2 GEMM runs row tiles (8 rows, vectorised over K) below 3 tokens and
    # column tiles (16 rows, vectorised over the rows, 4-token blocks, 128-token
    # chunks) from 3 on: a token's output must not depend on which ran it, on its
    # position in a block, on N's tail or on the threads.
    M = 133  # past one 128-token chunk, a 4-token remainder of 1
    x, smooth, L_down, qweight, scales, L_up, bias = layer(M, 45, 384, 32, torch.bfloat16, False, seed=3)
    many = LINEAR(x, smooth, L_down, qweight, scales, L_up, bias, False, isa)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = LINEAR(x, smooth, L_down, qweight, scales, L_up, bias, False, isa)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    for start, size in ((0, 1), (5, 1), (7, 2), (9, 3), (17, 4), (30, 5), (60, 17), (0, 128), (129, 4)):
        sub = x[start:start + size]
        assert torch.equal(LINEAR(sub, smooth, L_down, qweight, scales, L_up, bias, False, isa),
                           many[start:start + size]), (start, size)
    xq, xs, act = QUANT(x, smooth, L_down, False, isa)
    for size in (1, 2, 3, 4, 5):
        assert torch.equal(GEMM(xq[:size], xs[:size], qweight, scales, act[:size], L_up, bias, False, isa), many[:size])


@pytest.mark.parametrize("unsigned", [False, True], ids=["signed", "unsigned"])
def test_column_path_against_portable_and_reference(unsigned):
    # Without the low-rank branch and bias every path is the reference's float32
    # sequence: bit-identical at 3 to 64 tokens (the column path), N with a tail.
    if 1 not in ISAS:
        pytest.skip("this CPU has no AVX2")
    for M, N, K in ((3, 37, 640), (12, 384, 384), (64, 21, 1536)):
        x, smooth, L_down, qweight, scales, L_up, bias = layer(M, N, K, 0, torch.float32, unsigned, seed=M)
        y1 = LINEAR(x, smooth, L_down, qweight, scales, L_up, None, unsigned, 1)
        assert torch.equal(y1, LINEAR(x, smooth, L_down, qweight, scales, L_up, None, unsigned, 0))
        rq, rs, ract = reference.lowrank_quantize_act(x, smooth, L_down, unsigned)
        assert torch.equal(y1, reference.lowrank_w4a4_gemm(rq, rs, qweight, scales, ract, L_up, None, unsigned))


def test_internal_op_errors():
    x, smooth, L_down, qweight, scales, L_up, bias = layer(2, 32, 128, 16, torch.float32, False)
    args = dict(x=x, smooth=smooth, L_down=L_down, qweight=qweight, scales=scales, L_up=L_up, bias=bias)

    def call(isa=-1, **kw):
        a = {**args, **kw}
        return LINEAR(a["x"], a["smooth"], a["L_down"], a["qweight"], a["scales"], a["L_up"], a["bias"], False, isa)

    cases = [
        (ValueError, "isa: expected -1 \\(auto\\) or 0", dict(isa=9)),
        (TypeError, "x: expected dtype float32, float16 or bfloat16", dict(x=x.double())),
        (ValueError, "x: expected shape \\[..., K\\], got \\[\\]", dict(x=x[0, 0])),
        (ValueError, "x: expected K a positive multiple of 64", dict(x=x[:, :96])),
        (ValueError, "smooth: expected shape \\[K\\]", dict(smooth=smooth[:64])),
        (ValueError, "smooth: expected finite factors > 0, got 0", dict(smooth=smooth.clone().index_fill_(0, torch.tensor([5]), 0))),
        (ValueError, "L_down: expected shape \\[r, K\\]", dict(L_down=L_down[:8])),
        (TypeError, "L_down: expected dtype Float \\(that of x\\)", dict(L_down=L_down.half())),
        (TypeError, "qweight: expected dtype uint8", dict(qweight=qweight.to(torch.int8))),
        (ValueError, "qweight: expected shape \\[32, 64\\]", dict(qweight=qweight[:, :32].contiguous())),
        (TypeError, "scales: expected dtype Float \\(that of x\\)", dict(scales=scales.bfloat16())),
        (ValueError, "scales: expected shape \\[32, 2\\]", dict(scales=scales[:16])),
        (ValueError, "L_up: expected shape \\[32, 16\\]", dict(L_up=L_up[:, :8].contiguous())),
        (ValueError, "L_up: expected a contiguous tensor", dict(L_up=L_up.T.contiguous().T)),
        (TypeError, "bias: expected dtype Float \\(that of x\\)", dict(bias=bias.half())),
        (ValueError, "bias: expected shape \\[N\\] = \\[32\\]", dict(bias=bias[:31])),
    ]
    for exc, msg, kw in cases:
        with pytest.raises(exc, match=msg):
            call(**kw)


def test_any_leading_dims():
    # x [..., K] -> y [..., N], as the pair on the flattened tokens.
    x, smooth, L_down, qweight, scales, L_up, bias = layer(6, 24, 128, 16, torch.float32, False)
    y2 = LINEAR(x, smooth, L_down, qweight, scales, L_up, bias, False, -1)
    for shape in ((2, 3, 128), (1, 6, 128), (6, 1, 1, 128)):
        y = LINEAR(x.reshape(shape), smooth, L_down, qweight, scales, L_up, bias, False, -1)
        assert y.shape == (*shape[:-1], 24) and torch.equal(y.reshape(6, 24), y2)
    assert torch.equal(LINEAR(x[2], smooth, L_down, qweight, scales, L_up, bias, False, -1), y2[2])
    assert LINEAR(x[:0].reshape(0, 5, 128), smooth, L_down, qweight, scales, L_up, bias, False, -1).shape == (0, 5, 24)
    strided = torch.randn(128, 6).T  # a non-contiguous x
    assert torch.equal(LINEAR(strided, smooth, L_down, qweight, scales, L_up, bias, False, -1),
                       LINEAR(strided.contiguous(), smooth, L_down, qweight, scales, L_up, bias, False, -1))


def test_opcheck_internal_op():
    x, smooth, L_down, qweight, scales, L_up, bias = layer(3, 24, 128, 16, torch.bfloat16, True)
    torch.library.opcheck(LINEAR, (x, smooth, L_down, qweight, scales, L_up, bias, True, -1))
    torch.library.opcheck(LINEAR, (x.reshape(1, 3, 128), smooth, L_down, qweight, scales, L_up, bias, True, -1))
    torch.library.opcheck(LINEAR, (x.float(), smooth, L_down[:0].float(), qweight, scales.float(),
                                   L_up[:, :0].float(), None, False, 0))
