"""The C++ CPU kernel of lowrank_w4a16_linear (csrc/cpu/lowrank_quant.cpp), every
instruction-set path this CPU runs (portable C++, AVX2, AVX-512), against the
reference backend and float64: 1 to 16 tokens, shapes that are not multiples of
the kernel's row or token blocks, ranks 0/16/32, with and without bias, float32,
bfloat16 and float16 activations; determinism; the internal op's contract.

Skipped when svdkernels._C is not built, unless SVDKERNELS_REQUIRE_EXTENSION=1
(CI), where a missing extension is a failure.
"""

import pytest
import torch

import svdkernels
from svdkernels.testing.metrics import UNIT_ROUNDOFF, assert_within_bound
from svdkernels.testing.quant import random_w4a16_layer
from svdkernels.backends import select_backend
from svdkernels.quant import dequantize_weight, lowrank_w4a16_linear, quantize_weight
from svdkernels.reference import lowrank_quant as reference

from cpp_support import ISA_NAMES, isas, require_extension  # noqa: E402 (tests/cpp on sys.path)

require_extension()

OP = torch.ops.svdkernels._cpp_lowrank_w4a16_linear.default
ISAS = isas()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
UNIT = UNIT_ROUNDOFF


def check(y, x, layer):
    """``y`` within the float32-accumulation error bound of the exact (float64)
    result, and so is the reference backend (see tests/ops/test_lowrank_quant.py)."""
    qweight, scales, L_down, L_up, b = layer
    dtype = x.dtype
    W = dequantize_weight(qweight, scales, dtype=torch.float64)
    x64, Ld, Lu = x.double(), L_down.double(), L_up.double()
    y64 = x64 @ W.T + (x64 @ Ld.T) @ Lu.T
    mag = x64.abs() @ W.abs().T + (x64.abs() @ Ld.abs().T) @ Lu.abs().T
    if b is not None:
        y64, mag = y64 + b.double(), mag + b.double().abs()
    allowed = (x.shape[-1] + L_down.shape[0] + 2) * 2.0**-24 * mag + UNIT[dtype] * y64.abs()
    assert y.dtype == dtype and y.shape == y64.shape
    for name, out in (("cpp", y), ("reference", reference.lowrank_w4a16_linear(x, *layer))):
        try:
            assert_within_bound(out, y64, allowed)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES.get)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", range(1, 17))
def test_tokens_1_to_16(isa, dtype, M):
    layer = random_w4a16_layer(37, 192, 16, dtype, seed=M)  # 37 rows: full row blocks and a tail
    x = torch.randn(M, 192, generator=torch.Generator().manual_seed(100 + M)).to(dtype)
    check(OP(x, *layer, isa), x, layer)


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES.get)
@pytest.mark.parametrize("M", [1, 3, 16, 33])
@pytest.mark.parametrize(
    "N,K,r,bias",
    [(1, 64, 0, False), (2, 64, 16, True), (5, 128, 32, False), (16, 320, 0, True), (130, 256, 32, True),
     (67, 1024, 16, False)],
    ids=lambda v: str(v),
)
def test_shapes_ranks_bias(isa, M, N, K, r, bias):
    for dtype in (torch.bfloat16, torch.float32):
        layer = random_w4a16_layer(N, K, r, dtype, bias=bias)
        x = torch.randn(M, K).to(dtype)
        check(OP(x, *layer, isa), x, layer)


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES.get)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_nibble_value_and_zero_groups(isa, dtype):
    # Every byte value, so both nibbles take all 16 values (-8 included, which
    # quantize_weight never produces) in every position.
    N, K = 24, 512
    qweight = torch.arange(N * K // 2).remainder(251).to(torch.uint8).reshape(N, K // 2)
    scales = (torch.rand(N, K // 64) + 0.1).to(dtype)
    scales[3] = 0  # zero groups
    x = torch.randn(4, K).to(dtype)
    layer = (qweight, scales, torch.zeros(0, K, dtype=dtype), torch.zeros(N, 0, dtype=dtype), None)
    y = OP(x, *layer, isa)
    check(y, x, layer)
    assert (y[:, 3] == 0).all()


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES.get)
@pytest.mark.parametrize("mag", [1e-30, 1e-20, 1e20, 1e30], ids=str)
def test_activation_magnitudes(isa, mag):
    # The AVX2 path multiplies x by 2^-28 once (its weights come out as q·2^28):
    # exact while x·2^-28 is a normal float, and within the bound below that.
    layer = random_w4a16_layer(40, 256, 16, torch.float32, seed=7)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(8)) * mag
    y = OP(x, *layer, isa)
    assert torch.isfinite(y).all()
    check(y, x, layer)


def test_paths_agree_to_rounding():
    # Different paths sum in different orders: equal up to float32 rounding.
    layer = random_w4a16_layer(96, 512, 32, torch.float32)
    x = torch.randn(9, 512)
    outs = [OP(x, *layer, isa) for isa in ISAS]
    for y in outs[1:]:
        torch.testing.assert_close(y, outs[0], rtol=1e-5, atol=1e-4)  # sums of 512 terms of size ~1


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES.get)
def test_deterministic_across_threads_and_batch(isa):
    layer = random_w4a16_layer(200, 1024, 32, torch.bfloat16)
    x = torch.randn(16, 1024).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OP(x, *layer, isa)
    finally:
        torch.set_num_threads(threads)
    many = OP(x, *layer, isa)
    assert torch.equal(one, many)
    # A token's output does not depend on the other tokens of the call.
    for m in (0, 7, 15):
        assert torch.equal(OP(x[m : m + 1], *layer, isa), many[m : m + 1])


def test_strided_x_and_empty():
    layer = random_w4a16_layer(48, 128, 16, torch.float32)
    wide = torch.randn(6, 256)
    assert torch.equal(OP(wide[:, ::2], *layer, -1), OP(wide[:, ::2].contiguous(), *layer, -1))
    assert OP(torch.randn(0, 128), *layer, -1).shape == (0, 48)
    q, s = quantize_weight(torch.randn(1, 128))
    assert OP(torch.randn(3, 128), q[:0], s[:0], torch.zeros(0, 128), torch.zeros(0, 0), None, -1).shape == (3, 0)


def test_public_op_uses_cpp_by_default_and_reference_when_forced(monkeypatch):
    monkeypatch.delenv("SVDKERNELS_BACKEND", raising=False)
    assert select_backend("lowrank_w4a16_linear", torch.device("cpu"), has_cpp=True) == "cpp"
    qweight, scales, L_down, L_up, b = layer = random_w4a16_layer(64, 256, 32, torch.float32)
    x = torch.randn(2, 3, 256)
    y = lowrank_w4a16_linear(x, qweight, scales, L_down=L_down, L_up=L_up, bias=b)
    assert torch.equal(y, OP(x.reshape(6, 256), *layer, -1).reshape(2, 3, 64))
    with svdkernels.use_backend("reference"):
        y_ref = lowrank_w4a16_linear(x, qweight, scales, L_down=L_down, L_up=L_up, bias=b)
    assert torch.equal(y_ref, reference.lowrank_w4a16_linear(x, *layer))


def test_internal_op_errors():
    qweight, scales, L_down, L_up, b = random_w4a16_layer(32, 128, 16, torch.float32)
    x = torch.randn(2, 128)
    with pytest.raises(ValueError, match="isa: expected -1 \\(auto\\) or 0"):
        OP(x, qweight, scales, L_down, L_up, b, 7)
    with pytest.raises(TypeError, match="scales: expected dtype Float \\(that of x\\), got BFloat16"):
        OP(x, qweight, scales.bfloat16(), L_down, L_up, b, -1)
    with pytest.raises(ValueError, match="qweight: expected shape \\[N, K/2\\]"):
        OP(x, qweight[:, :16].contiguous(), scales, L_down, L_up, b, -1)
    with pytest.raises(ValueError, match="L_down: expected the rank r to be a multiple of 16"):
        OP(x, qweight, scales, L_down[:8].contiguous(), L_up[:, :8].contiguous(), b, -1)
    with pytest.raises(ValueError, match="L_up: expected a contiguous tensor"):
        OP(x, qweight, scales, L_down, L_up.T.contiguous().T, b, -1)
    with pytest.raises(ValueError, match="x: expected K a positive multiple of 64"):
        OP(torch.randn(2, 96), qweight, scales, L_down, L_up, b, -1)


def test_opcheck_internal_op():
    qweight, scales, L_down, L_up, b = random_w4a16_layer(24, 128, 16, torch.bfloat16)
    x = torch.randn(3, 128).bfloat16()
    torch.library.opcheck(OP, (x, qweight, scales, L_down, L_up, b, -1))
    torch.library.opcheck(OP, (x.float(), qweight, scales.float(), L_down[:0].float(), L_up[:, :0].float(), None, 0))


def test_torch_compile_fullgraph_with_cpp_backend():
    qweight, scales, L_down, L_up, b = random_w4a16_layer(32, 128, 16, torch.bfloat16)

    def f(x: torch.Tensor) -> torch.Tensor:
        return lowrank_w4a16_linear(x, qweight, scales, L_down=L_down, L_up=L_up, bias=b).float().relu()

    x = torch.randn(4, 128).bfloat16()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x), rtol=0, atol=0)
