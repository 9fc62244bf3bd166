"""The low-rank + 4-bit ops (SVDQuant): contract, math against float64, W4A4
accuracy by SQNR, bad input, opcheck and torch.compile.

The W4A16 checks run on every CPU backend present (reference, and cpp when
svdkernels._C is built); tests/cpp/ covers the C++ kernel's own paths.
"""
import pytest
import torch
import torch.nn.functional as F

import svdkernels
from svdkernels.testing.metrics import UNIT_ROUNDOFF, assert_within_bound, sqnr
from svdkernels.testing.quant import random_w4a16_layer
from svdkernels.backends import cpp_available
from svdkernels.quant import (
    UNSIGNED_SHIFT,
    compensate_unsigned_bias,
    dequantize_act,
    dequantize_weight,
    lowrank_quantize_act,
    lowrank_w4a4_gemm,
    lowrank_w4a16_linear,
    pack_int4,
    quantize_act,
    quantize_weight,
)

BACKENDS = ["reference"] + (["cpp"] if cpp_available() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Unit roundoff of the output dtype: the op rounds its float32 result once.
UNIT = UNIT_ROUNDOFF


def w4a16_float64(x, qweight, scales, L_down, L_up, bias):
    """The op's math in float64 on its (already rounded) inputs, and the forward
    error bound of float32 accumulation: ``(K + r + 2)·u32·(|x|·|W|ᵀ + |x|·|L_down|ᵀ·|L_up|ᵀ + |b|)``."""
    W = dequantize_weight(qweight, scales, dtype=torch.float64)
    x64, Ld, Lu = x.double(), L_down.double(), L_up.double()
    y = x64 @ W.T + (x64 @ Ld.T) @ Lu.T
    mag = x64.abs() @ W.abs().T + (x64.abs() @ Ld.abs().T) @ Lu.abs().T
    if bias is not None:
        y, mag = y + bias.double(), mag + bias.double().abs()
    n = x.shape[-1] + L_down.shape[0] + 2
    return y, n * 2.0**-24 * mag


def assert_within(out, y64, bound, dtype):
    # The op rounds its float32 result once to dtype: u·|y| on top of the bound.
    assert_within_bound(out, y64, bound + UNIT[dtype] * y64.abs())


# ---------------------------------------------------------------------------
# lowrank_w4a16_linear


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "lead,N,K,r,bias",
    [((1,), 48, 128, 16, True), ((7,), 37, 192, 32, False), ((2, 3), 64, 64, 0, True), ((16,), 19, 320, 16, True)],
    ids=lambda v: str(v),
)
def test_w4a16_against_float64(backend, dtype, lead, N, K, r, bias):
    qweight, scales, L_down, L_up, b = random_w4a16_layer(N, K, r, dtype, bias=bias)
    x = torch.randn(*lead, K).to(dtype)
    with svdkernels.use_backend(backend):
        y = lowrank_w4a16_linear(x, qweight, scales, L_down=L_down, L_up=L_up, bias=b)
    assert y.shape == (*lead, N) and y.dtype == dtype
    y64, bound = w4a16_float64(x, qweight, scales, L_down, L_up, b)
    assert_within(y, y64, bound, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_w4a16_low_rank_branch_and_bias_are_added(backend):
    # Zero weight: the output is exactly the branch plus bias (in float32 here).
    K, N, r = 128, 24, 16
    qweight = torch.zeros(N, K // 2, dtype=torch.uint8)
    scales = torch.zeros(N, K // 64)
    g = torch.Generator().manual_seed(11)
    L_down = torch.randn(r, K, generator=g)
    L_up = torch.randn(N, r, generator=g)
    b = torch.randn(N, generator=g)
    x = torch.randn(3, K, generator=g)
    with svdkernels.use_backend(backend):
        y = lowrank_w4a16_linear(x, qweight, scales, L_down=L_down, L_up=L_up, bias=b)
    # Against float64 within float32 accumulation's bound (it was a fixed 1e-5 on
    # unseeded inputs, which other tests' draws could push past).
    y64, bound = w4a16_float64(x, qweight, scales, L_down, L_up, b)
    torch.testing.assert_close(y64, (x.double() @ L_down.double().T) @ L_up.double().T + b.double())
    assert_within(y, y64, bound, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_w4a16_zero_tokens_and_strided_x(backend):
    qweight, scales, L_down, L_up, b = random_w4a16_layer(16, 128, 16, torch.float32)
    with svdkernels.use_backend(backend):
        empty = lowrank_w4a16_linear(torch.randn(0, 128), qweight, scales, L_down=L_down, L_up=L_up, bias=b)
        assert empty.shape == (0, 16)
        wide = torch.randn(5, 256)
        x = wide[:, ::2]  # last dim strided
        y = lowrank_w4a16_linear(x, qweight, scales, L_down=L_down, L_up=L_up, bias=b)
        y_ref = lowrank_w4a16_linear(x.contiguous(), qweight, scales, L_down=L_down, L_up=L_up, bias=b)
    assert torch.equal(y, y_ref)


def test_w4a16_errors():
    qweight, scales, L_down, L_up, b = random_w4a16_layer(32, 128, 16, torch.bfloat16)
    x = torch.randn(2, 128).bfloat16()

    def call(**kw):
        args = dict(x=x, qweight=qweight, scales=scales, L_down=L_down, L_up=L_up, bias=b)
        args.update(kw)
        x_ = args.pop("x")
        return lowrank_w4a16_linear(x_, args.pop("qweight"), args.pop("scales"), **args)

    with pytest.raises(ValueError, match="x: expected the last dim K to be a positive multiple of the group size 64, got K = 96"):
        call(x=torch.randn(2, 96).bfloat16())
    with pytest.raises(TypeError, match="x: expected dtype float32, float16 or bfloat16, got torch.float64"):
        call(x=x.double())
    with pytest.raises(TypeError, match="qweight: expected dtype uint8"):
        call(qweight=qweight.to(torch.int8))
    with pytest.raises(ValueError, match=r"qweight: expected shape \[N, K/2\] with K = 128 = \[32, 64\], got \[32, 32\]"):
        call(qweight=qweight[:, :32].contiguous())
    with pytest.raises(TypeError, match=r"scales: expected dtype torch.bfloat16 \(the dtype of x\), got torch.float32"):
        call(scales=scales.float())
    with pytest.raises(ValueError, match=r"scales: expected shape \[N, K/64\] with N = 32, K = 128 = \[32, 2\]"):
        call(scales=scales[:16].contiguous())
    with pytest.raises(ValueError, match="L_down: expected the rank r = L_down.shape\\[0\\] to be a multiple of 16 \\(0 allowed\\), got r = 8"):
        call(L_down=L_down[:8].contiguous(), L_up=L_up[:, :8].contiguous())
    with pytest.raises(ValueError, match=r"L_down: expected shape \[r, K\] with K = 128 = \[16, 128\], got \[16, 64\]"):
        call(L_down=L_down[:, :64].contiguous())
    with pytest.raises(ValueError, match=r"L_up: expected shape \[N, r\] with N = 32, r = 16 = \[32, 16\], got \[16, 32\]"):
        call(L_up=L_up.reshape(16, 32))
    with pytest.raises(TypeError, match="L_up: expected dtype torch.bfloat16"):
        call(L_up=L_up.half())
    with pytest.raises(ValueError, match=r"bias: expected shape \[N\] = \[32\], got \[31\]"):
        call(bias=b[:31])
    with pytest.raises(ValueError, match="L_up: expected a contiguous"):
        call(L_up=L_up.T.contiguous().T)
    with pytest.raises(ValueError, match="L_down: expected a tensor on meta"):
        call(x=x.to("meta"), qweight=qweight.to("meta"), scales=scales.to("meta"), L_up=L_up.to("meta"), bias=None)
    with pytest.raises(TypeError, match="qweight: expected a torch.Tensor, got list"):
        call(qweight=[1, 2])


# ---------------------------------------------------------------------------
# W4A4: lowrank_quantize_act + lowrank_w4a4_gemm


@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_act_matches_packing_and_down_projection(dtype, unsigned):
    g = torch.Generator().manual_seed(1)
    x = F.gelu(torch.randn(2, 5, 192, generator=g)).to(dtype)
    smooth = (torch.rand(192, generator=g) + 0.5).to(dtype)
    L_down = (torch.randn(32, 192, generator=g) / 14).to(dtype)
    xq, xscale, lowrank_act = lowrank_quantize_act(x, smooth, L_down, unsigned=unsigned)
    ref_q, ref_s = quantize_act(x, unsigned=unsigned, smooth=smooth)
    assert torch.equal(xq, ref_q) and torch.equal(xscale, ref_s)
    assert lowrank_act.shape == (2, 5, 32) and lowrank_act.dtype == torch.float32
    # The down projection reads the unsmoothed x; float32 sums of 192 terms.
    la64 = x.double() @ L_down.double().T
    bound = 194 * 2.0**-24 * (x.double().abs() @ L_down.double().abs().T)
    assert ((lowrank_act.double() - la64).abs() <= bound).all()


def test_w4a4_zero_tokens():
    qweight, scales, _, L_up, b = random_w4a16_layer(16, 128, 0, torch.float32)
    xq, xscale = quantize_act(torch.randn(0, 128))
    y = lowrank_w4a4_gemm(xq, xscale, qweight, scales, lowrank_act=torch.zeros(0, 0), L_up=L_up, bias=b)
    assert y.shape == (0, 16)


def test_w4a4_integer_products_are_exact():
    # Unit scales: every output is an integer sum, which float32 holds exactly.
    g = torch.Generator().manual_seed(2)
    M, N, K = 5, 24, 256
    qx = torch.randint(-8, 8, (M, K), generator=g)
    qw = torch.randint(-8, 8, (N, K), generator=g)
    y = lowrank_w4a4_gemm(
        pack_int4(qx), torch.ones(M, K // 64), pack_int4(qw), torch.ones(N, K // 64),
        lowrank_act=torch.zeros(M, 0), L_up=torch.zeros(N, 0),
    )
    assert torch.equal(y, (qx @ qw.T).float())


@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_w4a4_gemm_against_float64(dtype, unsigned):
    g = torch.Generator().manual_seed(3)
    N, K, r = 40, 256, 16
    qweight, scales, _, L_up, b = random_w4a16_layer(N, K, r, dtype, seed=3)
    xq, xscale = quantize_act(F.gelu(torch.randn(2, 3, K, generator=g)), unsigned=unsigned)
    lowrank_act = torch.randn(2, 3, r, generator=g)
    y = lowrank_w4a4_gemm(xq, xscale, qweight, scales, lowrank_act=lowrank_act, L_up=L_up, bias=b, unsigned=unsigned)
    assert y.shape == (2, 3, N) and y.dtype == dtype
    # deq(xq) as the GEMM sees it: q·s, the shift included when unsigned.
    xd = dequantize_act(xq, xscale, unsigned=unsigned, dtype=torch.float64) + (UNSIGNED_SHIFT if unsigned else 0.0)
    W = dequantize_weight(qweight, scales, dtype=torch.float64)
    y64 = xd @ W.T + lowrank_act.double() @ L_up.double().T + b.double()
    mag = xd.abs() @ W.abs().T + lowrank_act.double().abs() @ L_up.double().abs().T + b.double().abs()
    assert_within(y, y64, (K // 64 + r + 4) * 2.0**-24 * mag, dtype)


def test_unsigned_shift_is_compensated_by_the_bias():
    g = torch.Generator().manual_seed(4)
    N, K = 32, 256
    x = F.gelu(torch.randn(8, K, generator=g) * 2)
    smooth = torch.rand(K, generator=g) + 0.5
    qweight, scales = quantize_weight(torch.randn(N, K, generator=g))
    b = torch.randn(N, generator=g)
    L_down, L_up = torch.zeros(0, K), torch.zeros(N, 0)
    xq, xscale, la = lowrank_quantize_act(x, smooth, L_down, unsigned=True)
    bias_u = compensate_unsigned_bias(qweight, scales, b, smooth)
    y = lowrank_w4a4_gemm(xq, xscale, qweight, scales, lowrank_act=la, L_up=L_up, bias=bias_u, unsigned=True)
    # Against the layer on the dequantised (smoothed) activations: same numbers,
    # only the float32 rounding of the bias and of the sums differ.
    x_hat = dequantize_act(xq, xscale, unsigned=True, smooth=smooth, dtype=torch.float64) / smooth.double()
    W = dequantize_weight(qweight, scales, dtype=torch.float64)
    y64 = x_hat @ W.T + b.double()
    assert sqnr(y64, y) > 100
    # Without the compensation the outputs are off by c·Σ_k W[n,k]/λ_k.
    y_raw = lowrank_w4a4_gemm(xq, xscale, qweight, scales, lowrank_act=la, L_up=L_up, bias=b, unsigned=True)
    torch.testing.assert_close(y_raw - y, (UNSIGNED_SHIFT * (W / smooth.double()).sum(1)).float().expand_as(y),
                               rtol=1e-4, atol=1e-4)  # float32 outputs of magnitude ~20


def svdquant_layer(W, x, rank, alpha=0.5):
    """SVDQuant of ``W [N, K]`` for activations ``x``: smoothing, rank-``rank``
    branch from the SVD of the smoothed weight, int4 residual."""
    smooth = x.abs().amax(0).pow(alpha) / W.abs().amax(0).pow(1 - alpha)
    W_hat = W * smooth  # columns scaled: x·Wᵀ = (x/λ)·Ŵᵀ
    U, S, Vh = torch.linalg.svd(W_hat.double(), full_matrices=False)
    L_up = (U[:, :rank] * S[:rank]).float()
    L2 = Vh[:rank].float()
    qweight, scales = quantize_weight(W_hat - L_up @ L2)
    return smooth, (L2 / smooth).contiguous(), L_up.contiguous(), qweight, scales


def outlier_problem(seed=5):
    """A weight with a decaying spectrum and activations with outlier channels."""
    g = torch.Generator().manual_seed(seed)
    N, K, M = 256, 512, 64
    U = torch.linalg.qr(torch.randn(N, N, generator=g))[0]
    V = torch.linalg.qr(torch.randn(K, K, generator=g))[0]
    S = torch.cat([torch.full((16,), 20.0), torch.linspace(2, 0.5, N - 16)])
    W = (U * S) @ V[:, :N].T / K**0.5
    x = torch.randn(M, K, generator=g)
    x[:, torch.randperm(K, generator=g)[:8]] *= 30  # outlier channels
    return W, x


def test_w4a4_svdquant_beats_naive_w4a4():
    W, x = outlier_problem()
    y64 = x.double() @ W.double().T
    # Naive W4A4: round-to-nearest of both operands, no smoothing, no branch.
    qw, sw = quantize_weight(W)
    xq, xs = quantize_act(x)
    naive = lowrank_w4a4_gemm(xq, xs, qw, sw, lowrank_act=torch.zeros(64, 0), L_up=torch.zeros(256, 0))
    smooth, L_down, L_up, qweight, scales = svdquant_layer(W, x, 32)
    xq, xs, la = lowrank_quantize_act(x, smooth, L_down)
    ours = lowrank_w4a4_gemm(xq, xs, qweight, scales, lowrank_act=la, L_up=L_up)
    s_naive, s_ours = sqnr(y64, naive), sqnr(y64, ours)
    # Measured: naive 14.2 dB (outlier channels crush their groups), SVDQuant 36.3 dB.
    assert s_ours >= 34.0 and s_ours >= s_naive + 20.0, (s_naive, s_ours)


def test_w4a16_svdquant_branch_improves_sqnr():
    W, x = outlier_problem()
    y64 = x.double() @ W.double().T
    qw, sw = quantize_weight(W)
    r0 = lowrank_w4a16_linear(x, qw, sw, L_down=torch.zeros(0, 512), L_up=torch.zeros(256, 0))
    # Rank-32 branch of the unsmoothed weight (W4A16 has no activation outliers to move).
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    L_up, L_down = (U[:, :32] * S[:32]).float().contiguous(), Vh[:32].float().contiguous()
    qweight, scales = quantize_weight(W - L_up @ L_down)
    r32 = lowrank_w4a16_linear(x, qweight, scales, L_down=L_down, L_up=L_up)
    # Measured: 19.6 dB without the branch, 32.4 dB with it.
    assert sqnr(y64, r32) >= sqnr(y64, r0) + 11.0, (sqnr(y64, r0), sqnr(y64, r32))


def test_w4a4_errors():
    qweight, scales, _, L_up, b = random_w4a16_layer(32, 128, 16, torch.bfloat16)
    xq, xscale = quantize_act(torch.randn(3, 128))
    la = torch.randn(3, 16)

    def call(**kw):
        args = dict(xq=xq, xscale=xscale, qweight=qweight, scales=scales, lowrank_act=la, L_up=L_up, bias=b)
        args.update(kw)
        return lowrank_w4a4_gemm(args.pop("xq"), args.pop("xscale"), args.pop("qweight"), args.pop("scales"), **args)

    with pytest.raises(TypeError, match="xq: expected dtype uint8"):
        call(xq=xq.to(torch.int8))
    with pytest.raises(ValueError, match="multiple of the group size 64, got K = 96"):
        call(xq=xq[:, :48])
    with pytest.raises(TypeError, match="xscale: expected dtype torch.float32"):
        call(xscale=xscale.bfloat16())
    with pytest.raises(ValueError, match=r"xscale: expected shape \[..., K/64\] with K = 128 = \[3, 2\], got \[2, 2\]"):
        call(xscale=xscale[:2])
    with pytest.raises(ValueError, match=r"qweight: expected shape \[N, K/2\] with K = 128 = \[32, 64\]"):
        call(qweight=torch.zeros(32, 128, dtype=torch.uint8))
    with pytest.raises(TypeError, match="lowrank_act: expected dtype torch.float32"):
        call(lowrank_act=la.bfloat16())
    with pytest.raises(ValueError, match=r"lowrank_act: expected shape \[..., r\] with leading dims \[3\]"):
        call(lowrank_act=la[:2])
    with pytest.raises(ValueError, match="lowrank_act: expected the rank r = lowrank_act.shape\\[-1\\] to be a multiple of 16"):
        call(lowrank_act=la[:, :8].contiguous(), L_up=L_up[:, :8].contiguous())
    with pytest.raises(TypeError, match=r"L_up: expected dtype torch.bfloat16 \(the dtype of scales"):
        call(L_up=L_up.float())
    with pytest.raises(TypeError, match="unsigned: expected a bool"):
        call(unsigned=1)


def test_quantize_act_errors():
    x = torch.randn(2, 128)
    L_down = torch.randn(16, 128)
    with pytest.raises(ValueError, match=r"smooth: expected shape \[K\] = \[128\], got \[64\]"):
        lowrank_quantize_act(x, torch.ones(64), L_down)
    with pytest.raises(TypeError, match="smooth: expected dtype"):
        lowrank_quantize_act(x, torch.ones(128, dtype=torch.int64), L_down)
    with pytest.raises(ValueError, match="got r = 24"):
        lowrank_quantize_act(x, torch.ones(128), torch.randn(24, 128))
    with pytest.raises(TypeError, match=r"L_down: expected dtype torch.float32 \(the dtype of x\)"):
        lowrank_quantize_act(x, torch.ones(128), L_down.half())
    with pytest.raises(ValueError, match="x: expected the last dim K"):
        lowrank_quantize_act(torch.randn(2, 100), torch.ones(100), torch.randn(16, 100))


def test_forcing_triton_on_cpu_without_the_interpreter_is_an_error(monkeypatch):
    # Forcing a backend never falls back silently: on CPU tensors Triton needs the interpreter.
    pytest.importorskip("triton")
    monkeypatch.setattr(svdkernels.backends, "triton_interpreted", lambda: False)
    x = torch.randn(2, 128)
    with svdkernels.use_backend("triton"), pytest.raises(RuntimeError, match="needs CUDA tensors"):
        lowrank_quantize_act(x, torch.ones(128), torch.zeros(0, 128))


# ---------------------------------------------------------------------------
# Op contract


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    qweight, scales, L_down, L_up, b = random_w4a16_layer(24, 128, 16, torch.bfloat16)
    x = torch.randn(2, 3, 128).bfloat16()
    xq, xscale, la = lowrank_quantize_act(x.float(), torch.rand(128) + 0.5, L_down.float())
    with svdkernels.use_backend(backend):
        torch.library.opcheck(torch.ops.svdkernels.lowrank_w4a16_linear.default, (x, qweight, scales, L_down, L_up, b))
        torch.library.opcheck(
            torch.ops.svdkernels.lowrank_w4a16_linear.default,
            (x.float()[0], qweight, scales.float(), L_down[:0].float(), L_up[:, :0].float(), None),
        )
    for unsigned in (False, True):
        torch.library.opcheck(
            torch.ops.svdkernels.lowrank_quantize_act.default, (x, torch.rand(128) + 0.5, L_down, unsigned)
        )
        torch.library.opcheck(
            torch.ops.svdkernels.lowrank_w4a4_gemm.default, (xq, xscale, qweight, scales, la, L_up, b, unsigned)
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_w4a16_gradients_match_the_dequantised_layer(backend, bias):
    # QLoRA-style training on a 4-bit base: x, L_down, L_up and bias get the gradients
    # of y = x·deq(W)ᵀ + (x·L_downᵀ)·L_upᵀ + b (float32, so torch's autograd of the
    # dequantised layer is the oracle); the packed weight gets none.
    qweight, scales, L_down, L_up, b = random_w4a16_layer(24, 128, 16, torch.float32, bias=bias, seed=3)
    x = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(4))
    g = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(5))
    leaves = [t.clone().requires_grad_() for t in (x, L_down, L_up) + ((b,) if bias else ())]
    with svdkernels.use_backend(backend):
        y = svdkernels.lowrank_w4a16_linear(leaves[0], qweight, scales, L_down=leaves[1], L_up=leaves[2],
                                            bias=leaves[3] if bias else None)
    ours = torch.autograd.grad(y, leaves, g)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    W = dequantize_weight(qweight, scales, dtype=torch.float64)
    xr, Ld, Lu = ref_leaves[:3]
    y_ref = xr @ W.T + (xr @ Ld.T) @ Lu.T + (ref_leaves[3] if bias else 0)
    expected = torch.autograd.grad(y_ref, ref_leaves, g.double())
    for name, got, want in zip(("x", "L_down", "L_up", "bias"), ours, expected):
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        # float32 products of K = 128 (or M = 10, N = 24) terms: well inside 1e-5 relative.
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()), msg=name)


def test_w4a16_eager_fast_path_keeps_autograd():
    # The eager fast path (no custom-op layer) is taken only when nothing needs a gradient.
    qweight, scales, L_down, L_up, b = random_w4a16_layer(24, 128, 16, torch.float32)
    x = torch.randn(3, 128, requires_grad=True)
    y = svdkernels.lowrank_w4a16_linear(x, qweight, scales, L_down=L_down, L_up=L_up, bias=b)
    assert y.grad_fn is not None
    with torch.no_grad():
        y2 = svdkernels.lowrank_w4a16_linear(x, qweight, scales, L_down=L_down, L_up=L_up, bias=b)
    assert y2.grad_fn is None
    torch.testing.assert_close(y.detach(), y2, rtol=0, atol=0)


def test_torch_compile_fullgraph():
    qweight, scales, L_down, L_up, b = random_w4a16_layer(32, 128, 16, torch.float32)
    smooth = torch.rand(128) + 0.5

    def f(x: torch.Tensor) -> torch.Tensor:
        y16 = lowrank_w4a16_linear(x, qweight, scales, L_down=L_down, L_up=L_up, bias=b)
        xq, xs, la = lowrank_quantize_act(x, smooth, L_down / smooth)
        y4 = lowrank_w4a4_gemm(xq, xs, qweight, scales, lowrank_act=la, L_up=L_up, bias=b)
        return y16 - y4

    x = torch.randn(3, 128)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))
