"""Int4 packing and quantisation (svdkernels/formats/int4.py): the documented
layouts, round trips, zero groups, error bounds and bad input."""
import pytest
import torch

from svdkernels.quant import (
    GROUP_SIZE,
    UNSIGNED_SHIFT,
    dequantize_act,
    dequantize_weight,
    pack_int4,
    quantize_act,
    quantize_weight,
    unpack_int4,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def grid_weight(N: int, K: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``W = q·s`` exactly on the int4 grid, each group's absmax exactly ``7·s``."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-7, 8, (N, K), generator=g)
    q[:, ::GROUP_SIZE] = 7  # absmax 7 in every group, so the quantiser picks s back
    s = torch.exp2(torch.randint(-6, 3, (N, K // GROUP_SIZE), generator=g).float())  # exact in every dtype
    W = (q.float().unflatten(1, (-1, GROUP_SIZE)) * s[..., None]).flatten(1)
    return W.to(dtype), q, s.to(dtype)


# ---------------------------------------------------------------------------
# Nibbles


def test_nibble_order_even_k_is_low_nibble():
    q = torch.tensor([[1, -2, -8, 7, 0, -1]])
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[0x01 | (0xE << 4), 0x8 | (0x7 << 4), 0x0 | (0xF << 4)]]
    assert pack_int4(torch.tensor([3, 12]), signed=False).tolist() == [3 | (12 << 4)]


@pytest.mark.parametrize("signed", [True, False])
def test_pack_unpack_round_trip(signed):
    lo, hi = (-8, 8) if signed else (0, 16)
    q = torch.randint(lo, hi, (3, 5, 128), generator=torch.Generator().manual_seed(1))
    packed = pack_int4(q, signed=signed)
    assert packed.shape == (3, 5, 64)
    out = unpack_int4(packed, signed=signed)
    assert out.dtype == torch.int8
    assert torch.equal(out.long(), q)


def test_every_byte_unpacks_and_repacks():
    b = torch.arange(256, dtype=torch.uint8)
    for signed in (True, False):
        assert torch.equal(pack_int4(unpack_int4(b, signed=signed), signed=signed), b)


def test_pack_errors():
    with pytest.raises(TypeError, match="q: expected an integer dtype"):
        pack_int4(torch.zeros(4))
    with pytest.raises(ValueError, match="K even"):
        pack_int4(torch.zeros(3, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\].*got values in \[-9, 0\]"):
        pack_int4(torch.tensor([-9, 0]))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4(torch.tensor([-1, 0]), signed=False)
    with pytest.raises(TypeError, match="packed: expected dtype uint8"):
        unpack_int4(torch.zeros(4, dtype=torch.int8))


# ---------------------------------------------------------------------------
# Weights


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weight_on_the_grid_round_trips_exactly(dtype):
    W, q, s = grid_weight(16, 256, dtype)
    qweight, scales = quantize_weight(W)
    assert qweight.shape == (16, 128) and qweight.dtype == torch.uint8
    assert scales.shape == (16, 4) and scales.dtype == dtype
    assert torch.equal(scales, s)
    assert torch.equal(unpack_int4(qweight).long(), q)
    assert torch.equal(dequantize_weight(qweight, scales), W)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weight_error_at_most_half_a_step(dtype):
    W = torch.randn(24, 192, generator=torch.Generator().manual_seed(2)).to(dtype)
    qweight, scales = quantize_weight(W)
    s = scales.float().repeat_interleave(GROUP_SIZE, dim=1)
    err = (dequantize_weight(qweight, scales, dtype=torch.float32) - W.float()).abs()
    # Round to nearest: half a step, plus the float32 rounding of q·s (one ulp of |W|).
    assert (err <= s / 2 * (1 + 1e-6) + W.float().abs() * 2**-23).all()
    # absmax/7 keeps every value in [-7, 7]: -8 is never used.
    q = unpack_int4(qweight)
    assert q.min() >= -7 and q.max() <= 7
    assert q.abs().amax(1).min() == 7


def test_scales_dtype_argument():
    W = torch.randn(8, 64)
    qweight, scales = quantize_weight(W, dtype=torch.bfloat16)
    assert scales.dtype == torch.bfloat16
    assert dequantize_weight(qweight, scales).dtype == torch.bfloat16
    assert dequantize_weight(qweight, scales, dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_groups_give_exact_zeros(dtype):
    W = torch.randn(4, 256).to(dtype)
    W[1] = 0  # a zero row
    W[2, 64:128] = 0  # a zero group
    qweight, scales = quantize_weight(W)
    out = dequantize_weight(qweight, scales)
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all() and (out[2, 64:128] == 0).all()
    assert (scales[1] == 0).all() and scales[2, 1] == 0
    assert (unpack_int4(qweight)[1] == 0).all()


def test_scale_underflow_in_float16_gives_zeros_not_nan():
    W = torch.full((2, 64), 1e-9)  # absmax/7 underflows float16 to 0
    W[1] = 1.0
    qweight, scales = quantize_weight(W, dtype=torch.float16)
    out = dequantize_weight(qweight, scales)
    assert scales[0, 0] == 0 and (out[0] == 0).all()
    assert torch.isfinite(out).all() and (out[1] == 1).all()


def test_weight_errors():
    with pytest.raises(ValueError, match="multiple of the group size 64, got K = 96"):
        quantize_weight(torch.randn(4, 96))
    with pytest.raises(ValueError, match=r"W: expected shape \[N, K\]"):
        quantize_weight(torch.randn(64))
    with pytest.raises(TypeError, match="W: expected dtype"):
        quantize_weight(torch.zeros(4, 64, dtype=torch.int32))
    with pytest.raises(TypeError, match="W: expected a torch.Tensor"):
        quantize_weight([[1.0] * 64])
    with pytest.raises(TypeError, match="dtype: expected"):
        quantize_weight(torch.randn(4, 64), dtype=torch.float64)
    for bad in (float("nan"), float("inf"), -float("inf")):
        W = torch.randn(4, 128)
        W[2, 70] = bad
        with pytest.raises(ValueError, match=r"W: expected finite values, got .* at index \(2, 70\)"):
            quantize_weight(W)
    with pytest.raises(ValueError, match="overflows the scales dtype torch.float16"):
        quantize_weight(torch.full((1, 64), 1e6), dtype=torch.float16)


def test_dequantize_weight_errors():
    qweight, scales = quantize_weight(torch.randn(8, 128))
    with pytest.raises(ValueError, match=r"scales: expected shape \[N, K/64\] = \(8, 2\)"):
        dequantize_weight(qweight, scales[:, :1])
    with pytest.raises(TypeError, match="qweight: expected dtype uint8"):
        dequantize_weight(qweight.to(torch.int8), scales)
    with pytest.raises(TypeError, match="scales: expected dtype"):
        dequantize_weight(qweight, scales.double())
    with pytest.raises(ValueError, match="multiple of the group size"):
        dequantize_weight(qweight[:, :48], scales[:, :1])


# ---------------------------------------------------------------------------
# Activations


def _step(xscale: torch.Tensor) -> torch.Tensor:
    return xscale.repeat_interleave(GROUP_SIZE, dim=-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_act_signed_round_trip(dtype):
    x = torch.randn(2, 3, 256, generator=torch.Generator().manual_seed(3)).to(dtype)
    xq, xscale = quantize_act(x)
    assert xq.shape == (2, 3, 128) and xq.dtype == torch.uint8
    assert xscale.shape == (2, 3, 4) and xscale.dtype == torch.float32
    torch.testing.assert_close(xscale, x.float().unflatten(-1, (4, 64)).abs().amax(-1) / 7, rtol=0, atol=0)
    err = (dequantize_act(xq, xscale) - x.float()).abs()
    assert (err <= _step(xscale) / 2 * (1 + 1e-6)).all()


def test_act_unsigned_gelu_round_trip_and_finer_grid():
    h = torch.randn(16, 512, generator=torch.Generator().manual_seed(4)) * 3
    x = torch.nn.functional.gelu(h)
    assert x.min() > -UNSIGNED_SHIFT
    xq, xscale = quantize_act(x, unsigned=True)
    q = unpack_int4(xq, signed=False)
    assert q.min() >= 0 and q.max() == 15
    torch.testing.assert_close(xscale, (x + UNSIGNED_SHIFT).unflatten(-1, (8, 64)).amax(-1) / 15, rtol=0, atol=0)
    out = dequantize_act(xq, xscale, unsigned=True)
    assert ((out - x).abs() <= _step(xscale) / 2 * (1 + 1e-6) + 1e-7).all()
    # The unsigned grid spends all 16 levels on [0, max + c]: about half the step of
    # the signed one. The mean squared error drops less than 4x (measured 0.41x)
    # because the negative half of a GELU's outputs sits within c of zero, where
    # both grids round to their zero level.
    xq_s, xscale_s = quantize_act(x)
    err_u = (out - x).pow(2).mean()
    err_s = (dequantize_act(xq_s, xscale_s) - x).pow(2).mean()
    assert err_u < 0.5 * err_s, (err_u, err_s)


def test_act_unsigned_clamps_below_the_shift():
    x = torch.zeros(1, 64)
    x[0, 0] = -1.0  # below -0.171875: clamps to q = 0, i.e. -0.171875
    x[0, 1] = 2.0
    xq, xscale = quantize_act(x, unsigned=True)
    out = dequantize_act(xq, xscale, unsigned=True)
    assert out[0, 0] == -UNSIGNED_SHIFT
    assert unpack_int4(xq, signed=False)[0, 0] == 0


@pytest.mark.parametrize("unsigned", [False, True])
def test_act_zero_groups(unsigned):
    x = torch.randn(3, 128)
    fill = -UNSIGNED_SHIFT if unsigned else 0.0  # zero after the shift
    x[1] = fill
    x[2, :64] = fill
    xq, xscale = quantize_act(x, unsigned=unsigned)
    assert xscale[1].eq(0).all() and xscale[2, 0] == 0
    out = dequantize_act(xq, xscale, unsigned=unsigned)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], x[1]) and torch.equal(out[2, :64], x[2, :64])


@pytest.mark.parametrize("unsigned", [False, True])
def test_act_smoothing(unsigned):
    g = torch.Generator().manual_seed(5)
    x = torch.nn.functional.gelu(torch.randn(4, 128, generator=g))
    smooth = torch.rand(128, generator=g) * 4 + 0.1
    xq, xscale = quantize_act(x, unsigned=unsigned, smooth=smooth)
    ref_q, ref_s = quantize_act((x + UNSIGNED_SHIFT) / smooth - UNSIGNED_SHIFT if unsigned else x / smooth,
                                unsigned=unsigned)
    # What is quantised is x/λ (signed) or (x + c)/λ (unsigned: shift first).
    torch.testing.assert_close(xscale, ref_s, rtol=1e-6, atol=0)
    out = dequantize_act(xq, xscale, unsigned=unsigned, smooth=smooth)
    assert ((out - x).abs() <= _step(xscale) * smooth / 2 * (1 + 1e-5) + 1e-6).all()


def test_act_errors():
    with pytest.raises(ValueError, match="x: expected the last dim K to be a positive multiple of the group size 64, got K = 100"):
        quantize_act(torch.randn(2, 100))
    with pytest.raises(TypeError, match="x: expected dtype"):
        quantize_act(torch.randn(2, 64).double())
    with pytest.raises(ValueError, match=r"smooth: expected shape \[K\] = \(64,\)"):
        quantize_act(torch.randn(2, 64), smooth=torch.ones(32))
    xq, xscale = quantize_act(torch.randn(2, 64))
    with pytest.raises(TypeError, match="xscale: expected dtype float32"):
        dequantize_act(xq, xscale.half())
    with pytest.raises(ValueError, match=r"xscale: expected shape \[..., K/64\]"):
        dequantize_act(xq, xscale[:1])
