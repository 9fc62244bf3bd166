"""LowRankQuantLinear (svdkernels/quant/linear.py): the layer against the float
math of its own buffers, the decomposition's invariants, dtypes, LoRA merging and
bad input."""
import math

import pytest
import torch

from svdkernels.testing.metrics import sqnr
from svdkernels.quant import (
    UNSIGNED_SHIFT,
    LowRankQuantLinear,
    dequantize_act,
    dequantize_weight,
    quantize_act,
)
from svdkernels.quant.linear import decompose
from svdkernels.testing.errors import assert_raises_naming

N, K = 96, 256


def weight(seed: int = 0) -> torch.Tensor:
    """A trained-looking weight: a decaying rank-16 part plus noise."""
    g = torch.Generator().manual_seed(seed)
    U, V = torch.randn(N, 16, generator=g), torch.randn(16, K, generator=g)
    return (U * torch.logspace(0, -1, 16)) @ V / 4 + 0.05 * torch.randn(N, K, generator=g)


def inputs(M: int = 24, *, gelu: bool = False, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    x[:, :4] *= 15  # outlier channels, as transformer activations have
    return torch.nn.functional.gelu(x) if gelu else x


def reference(layer: LowRankQuantLinear, x: torch.Tensor) -> torch.Tensor:
    """The layer's output from its buffers with the packing functions, in float64:
    ``x̃·deq(R)ᵀ`` (W4A4: ``x̃ = deq(Q(x/λ))``, the unsigned shift undone) plus the
    branch ``(x·L_downᵀ)·L_upᵀ`` and the float bias. (With ``unsigned`` the stored
    bias is compensated; adding back ``c·Σ_k deq(R)/λ`` gives the float bias.)"""
    R = dequantize_weight(layer.qweight, layer.scales, dtype=torch.float64)
    lam = layer.smooth.double()
    xd = x.double()
    if layer.acts is None:
        y = xd @ R.T
    else:
        xq, xs = quantize_act(x.to(layer.dtype), unsigned=layer.unsigned, smooth=layer.smooth)
        x_tilde = dequantize_act(xq, xs, unsigned=layer.unsigned, smooth=layer.smooth, dtype=torch.float64)
        y = (x_tilde / lam) @ R.T
    y = y + (xd @ layer.L_down.double().T) @ layer.L_up.double().T
    if layer.bias is not None:
        bias = layer.bias.double()
        if layer.unsigned:
            bias = bias + UNSIGNED_SHIFT * (R / lam).sum(1)
        y = y + bias
    return y


# min_db: SQNR against the float layer, measured 18.8 / 43.8 / 10.5 / 33.7 / 37.5 dB
# (random λ, outlier channels; the rank-16 weight fits the r = 32 branch).
CASES = [
    pytest.param(0, None, False, 15, id="r0-w4a16"),
    pytest.param(32, None, False, 35, id="r32-w4a16"),
    pytest.param(0, "int4", False, 8, id="r0-w4a4"),
    pytest.param(32, "int4", False, 28, id="r32-w4a4"),
    pytest.param(32, "int4", True, 30, id="r32-w4a4-unsigned"),
]


@pytest.mark.parametrize("rank, acts, unsigned, min_db", CASES)
def test_layer_matches_the_math_of_its_buffers(rank, acts, unsigned, min_db):
    W = weight()
    b = torch.randn(N, generator=torch.Generator().manual_seed(2))
    smooth = torch.rand(K, generator=torch.Generator().manual_seed(3)) + 0.5
    layer = LowRankQuantLinear.from_float(W, b, smooth=smooth, rank=rank, acts=acts, unsigned=unsigned)
    x = inputs(gelu=unsigned)
    y = layer(x)
    assert y.shape == (x.shape[0], N) and y.dtype == torch.float32
    # float32 accumulation against float64 of the same quantised operands.
    torch.testing.assert_close(y.double(), reference(layer, x), rtol=1e-4, atol=1e-4)
    # And it approximates the float layer.
    assert sqnr(x @ W.T + b, y) > min_db
    assert layer.rank == rank and layer.acts == acts and layer.unsigned == unsigned


@pytest.mark.parametrize("acts", [None, "int4"])
def test_residual_is_the_quantised_rest_of_the_weight(acts):
    """W·diag(λ) = L̂ + R̂ with |R̂ − deq(R̂)| <= scale/2 (W4A4 stores R̂; W4A16
    stores the unsmoothed R = R̂/λ, which the 16-bit x multiplies directly)."""
    W = weight()
    smooth = torch.rand(K, generator=torch.Generator().manual_seed(4)) + 0.5
    layer = LowRankQuantLinear.from_float(W, smooth=smooth, rank=32, acts=acts, refine_iters=2)
    L = layer.L_up @ layer.L_down  # unsmoothed: L_down holds 1/λ
    R = dequantize_weight(layer.qweight, layer.scales)
    half_step = layer.scales.repeat_interleave(64, dim=1) / 2 + 1e-6
    stored = (W - L) * smooth if acts else W - L
    assert ((stored - R).abs() <= half_step).all()


def test_branch_absorbs_low_rank_structure():
    W = weight()
    x = inputs()
    y = x @ W.T
    r0 = LowRankQuantLinear.from_float(W, rank=0, acts=None)(x)
    r32 = LowRankQuantLinear.from_float(W, rank=32, acts=None)(x)
    assert sqnr(y, r32) > sqnr(y, r0) + 6


def test_refinement_never_increases_the_weight_error():
    W = weight()
    lam = torch.stack([torch.ones(K), torch.rand(K, generator=torch.Generator().manual_seed(5)) + 0.5])
    for smoothed in (True, False):
        errs = [decompose(W, lam, rank=32, refine_iters=it, smoothed_residual=smoothed,
                          dtype=torch.float32, seed=0).weight_error for it in (0, 1, 3)]
        assert (errs[1] <= errs[0]).all() and (errs[2] <= errs[1]).all(), errs


def test_unsigned_bias_compensation():
    """Unsigned activations carry the shift into the GEMM; the stored bias cancels
    it, with or without a float bias."""
    W = weight()
    x = inputs(gelu=True)
    for b in (None, torch.randn(N)):
        layer = LowRankQuantLinear.from_float(W, b, rank=32, acts="int4", unsigned=True)
        assert layer.bias is not None
        want = x @ W.T + (0 if b is None else b)
        assert sqnr(want, layer(x)) > 20
        signed = LowRankQuantLinear.from_float(W, b, rank=32, acts="int4", unsigned=False)
        # the unsigned grid has twice the resolution on GELU outputs
        assert sqnr(want, layer(x)) > sqnr(want, signed(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("acts", [None, "int4"])
def test_compute_dtype_and_output_dtype(dtype, acts):
    W, b = weight(), torch.randn(N)
    layer = LowRankQuantLinear.from_float(W, b, rank=32, acts=acts, dtype=dtype)
    assert layer.dtype == dtype
    assert {layer.scales.dtype, layer.L_down.dtype, layer.L_up.dtype, layer.bias.dtype} == {dtype}
    assert layer.smooth.dtype == torch.float32 and layer.qweight.dtype == torch.uint8
    x = inputs().reshape(2, 12, K)  # leading dims are kept
    for x_dtype in (torch.float32, torch.bfloat16):
        y = layer(x.to(x_dtype))
        assert y.shape == (2, 12, N) and y.dtype == x_dtype
    # The compute dtype decides the result: x is cast to it first.
    torch.testing.assert_close(layer(x), layer(x.to(dtype)).float(), rtol=0, atol=0)
    assert sqnr(x @ W.T + b, layer(x)) > 15


@pytest.mark.parametrize("acts, unsigned", [(None, False), ("int4", False), ("int4", True)])
def test_merge_lora_adds_exactly_the_lora_output(acts, unsigned):
    W = weight()
    layer = LowRankQuantLinear.from_float(W, torch.randn(N), rank=32, acts=acts, unsigned=unsigned,
                                          smooth=torch.rand(K) + 0.5)
    x = inputs(gelu=unsigned)
    before = layer(x)
    g = torch.Generator().manual_seed(7)
    A, B, scale = torch.randn(8, K, generator=g), torch.randn(N, 8, generator=g), 0.75
    assert layer.merge_lora(A, B, scale) is layer
    assert layer.rank == 48  # 32 + 8, zero-padded to a multiple of 16
    assert not layer.L_down[40:].any() and not layer.L_up[:, 40:].any()
    # The quantised part is computed the same way as before; what is added is the
    # LoRA in float32 (no quantisation), so the difference is exact up to rounding.
    torch.testing.assert_close(layer(x) - before, scale * (x @ A.T) @ B.T, rtol=1e-5, atol=1e-4)


def test_extra_repr():
    layer = LowRankQuantLinear.from_float(weight(), torch.randn(N), rank=16, acts="int4", unsigned=True)
    text = repr(layer)
    for word in (f"in_features={K}", f"out_features={N}", "rank=16", "acts=int4", "unsigned=True", "bias=True"):
        assert word in text, text


def test_errors():
    W = weight()
    bad = W.clone()
    bad[3, 5] = float("nan")
    build = LowRankQuantLinear.from_float
    layer = build(W, rank=16)
    parts = dict(qweight=layer.qweight, scales=layer.scales, L_down=layer.L_down, L_up=layer.L_up, smooth=layer.smooth)
    A, B = torch.randn(4, K), torch.randn(N, 4)
    cases = [
        (lambda: build(W, rank=24), ValueError, ["rank", "multiple of 16", "24"]),
        (lambda: build(W, rank=112), ValueError, ["rank", "at most", "96", "112"]),
        (lambda: build(W, rank=16.0), TypeError, ["rank", "int", "float"]),
        (lambda: build(W[:, :100]), ValueError, ["weight", "multiple", "100"]),
        (lambda: build(bad), ValueError, ["weight", "finite"]),
        (lambda: build(W, acts="int8"), ValueError, ["acts", "'int4' or None", "int8"]),
        (lambda: build(W, bias=torch.zeros(5)), ValueError, ["bias", "[96]", "[5]"]),
        (lambda: build(W, smooth=torch.ones(7)), ValueError, ["smooth", "[256]", "[7]"]),
        (lambda: build(W, acts=None, unsigned=True), ValueError, ["unsigned", "acts=None"]),
        (lambda: build(W, refine_iters=-1), ValueError, ["refine_iters", "-1"]),
        (lambda: LowRankQuantLinear(**{**parts, "L_up": layer.L_up.bfloat16()}), TypeError,
         ["L_up", "torch.float32", "bfloat16"]),
        (lambda: LowRankQuantLinear(**{**parts, "L_up": layer.L_up[:, :8].contiguous()}), ValueError,
         ["L_up", "[96, 16]", "[96, 8]"]),
        (lambda: LowRankQuantLinear(**{**parts, "smooth": -layer.smooth}), ValueError, ["smooth", "positive"]),
        (lambda: LowRankQuantLinear(**parts, acts="int4", unsigned=True), ValueError, ["bias", "unsigned"]),
        (lambda: layer.merge_lora(torch.randn(4, 100), B), ValueError, ["A", "[r2, K]", "256"]),
        (lambda: layer.merge_lora(A, torch.randn(N, 5)), ValueError, ["B", "[96, 4]", "[96, 5]"]),
        (lambda: layer.merge_lora(A, B, scale="2"), TypeError, ["scale", "float"]),
        (lambda: layer.merge_lora(torch.full((4, K), math.inf), B), ValueError, ["A", "finite"]),
    ]
    for call, exc, words in cases:
        assert_raises_naming(call, exc, words)
