"""Triton kernels of the SVDQuant ops (levels 2 and 3 of DESIGN.md's verification plan).

Level 2: the three ops forced onto the triton backend, against the reference backend
on CPU copies of the same inputs. Without a GPU the kernels run through the Triton
interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1), so sizes are
small; N is never a multiple of the column tile, M spans several row tiles, ranks
span one and two rank chunks. ``xq`` and ``xscale`` must be bit-identical to the
reference (the kernel repeats ``quantize_act``'s float32 operations); float outputs
are checked against a forward error bound (:func:`_assert_within`).

Level 3: every kernel x config x dtype (``compile_cases()``) compiles for sm_80 and
sm_90 with zero spills, fitting shared memory, on the tensor cores; ``pytest -s``
prints registers and shared memory per build.
"""

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import svdkernels  # noqa: E402
from svdkernels.backends import triton_interpreted  # noqa: E402
from svdkernels.ops.lowrank_quant import (  # noqa: E402
    lowrank_quantize_act,
    lowrank_w4a4_gemm,
    lowrank_w4a16_linear,
)
from svdkernels.formats.int4 import (  # noqa: E402
    GROUP_SIZE,
    UNSIGNED_SHIFT,
    dequantize_weight,
    quantize_weight,
    unpack_int4,
)
from svdkernels.testing.metrics import UNIT_ROUNDOFF, assert_within_bound  # noqa: E402
from svdkernels.testing.quant import random_w4a16_layer  # noqa: E402
from svdkernels.triton import lowrank_quant as tq  # noqa: E402

RUNS = torch.cuda.is_available() or triton_interpreted()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Unit roundoff of each output dtype.
UNIT = UNIT_ROUNDOFF

needs_kernels = pytest.mark.skipif(not RUNS, reason="needs CUDA or TRITON_INTERPRET=1")


def _dev(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


def _cpu(out):
    return tuple(t.cpu() for t in out) if isinstance(out, tuple) else out.cpu()


def _on(backend, fn, *args, **kwargs):
    """``fn`` on ``backend``: triton on DEVICE, the reference (the oracle) on CPU copies."""
    if backend == "reference":
        args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
        kwargs = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with svdkernels.use_backend(backend):
        return _cpu(fn(*args, **kwargs))


def _assert_within(out, ref, mag, n, dtype):
    """``|out - ref| <= 2u·|ref| + 2·(n + 16)·2⁻²⁴·mag`` elementwise.

    Both round a float32 result once to ``dtype`` (unit roundoff ``u``), which puts
    two nearby float32 values up to one ulp (``2u``) apart; the float32 results differ
    by summation order, at most ``γ_n·mag`` each for ``n`` terms with absolute sum
    ``mag`` (Higham), plus 2^-20 per product for the GPU's 2x/3xTF32 (the ``+ 16``)."""
    assert out.dtype == ref.dtype
    assert_within_bound(out, ref, 2 * UNIT[dtype] * ref.double().abs() + 2 * (n + 16) * 2.0**-24 * mag)


def _activations(lead, K, dtype, unsigned, seed):
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(*lead, K, generator=g)
    if unsigned:
        x = F.gelu(x)  # >= -0.17, the unsigned grid's input
        x.view(-1)[::7] = -1.0  # below the shift: clamps to q = 0
    return x.to(dtype)


def _smooth(K, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(K, generator=g) + 0.5


def _L_down(r, K, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(r, K, generator=g) / K**0.5).to(dtype)  # branch of size O(|x|)


# lead dims, N, K, r, bias: N not a multiple of any column tile; M = 1, 3, 6, 17, 40
# (one and several row tiles, "decode" and "mid" configs); r = 48 spans two rank chunks.
SHAPES = [
    ((1,), 40, 64, 0, False),
    ((3,), 72, 192, 16, True),
    ((17,), 130, 320, 32, True),
    ((2, 3), 72, 192, 48, False),
    ((40,), 130, 192, 32, True),
]


def _id(shape):
    lead, N, K, r, bias = shape
    return f"M{'x'.join(map(str, lead))}-N{N}-K{K}-r{r}" + ("-bias" if bias else "")


# ---------------------------------------------------------------- lowrank_quantize_act


def _quantize_both(x, smooth, L_down, unsigned):
    out = _on("triton", lowrank_quantize_act, *_dev(x, smooth, L_down), unsigned=unsigned)
    ref = _on("reference", lowrank_quantize_act, x, smooth, L_down, unsigned=unsigned)
    return out, ref


def _check_lowrank_act(la, ref_la, x, L_down):
    # float32 sum of K products: within γ_K·(|x|·|L_down|ᵀ) of the reference's.
    mag = x.double().abs() @ L_down.double().abs().T
    _assert_within(la, ref_la, mag, x.shape[-1], torch.float32)


@needs_kernels
@pytest.mark.parametrize("unsigned", [False, True], ids=["signed", "unsigned"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_quantize_act(shape, dtype, unsigned):
    lead, _, K, r, _ = shape
    dt = DTYPES[dtype]
    x = _activations(lead, K, dt, unsigned, seed=K + r)
    smooth = _smooth(K, seed=r).to(torch.float16 if dtype == "fp32" else torch.float32)  # any float dtype
    L_down = _L_down(r, K, dt, seed=K)
    (xq, xs, la), (rq, rs, rla) = _quantize_both(x, smooth, L_down, unsigned)
    assert xq.shape == (*lead, K // 2) and xs.shape == (*lead, K // GROUP_SIZE) and la.shape == (*lead, r)
    assert torch.equal(xq, rq) and torch.equal(xs, rs)
    _check_lowrank_act(la, rla, x, L_down)


@needs_kernels
@pytest.mark.parametrize("unsigned", [False, True], ids=["signed", "unsigned"])
def test_quantize_act_ties_round_to_even(unsigned):
    # x/s on exact half-integers: s = 1 (absmax 7, or max 15 after the shift), so
    # q = round-half-even(x/s) as torch.round gives it.
    K = 64
    v = torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5, 4.5, 5.5, 6.5, -6.5])
    v = v.abs() if unsigned else v
    x = torch.zeros(2, K)
    x[:, : v.numel()] = v
    x[:, -1] = 15.0 if unsigned else 7.0
    if unsigned:
        x = x - UNSIGNED_SHIFT  # exact: the kernel shifts it back
    (xq, xs, _), (rq, rs, _) = _quantize_both(x, torch.ones(K), torch.zeros(0, K), unsigned)
    assert torch.equal(xq, rq) and torch.equal(xs, rs)
    q = unpack_int4(xq, signed=not unsigned)[0, : v.numel()]
    assert q.tolist() == torch.round(v).to(torch.int8).tolist()


@needs_kernels
@pytest.mark.parametrize("config", tq.QUANT_CONFIGS, ids=lambda c: c.name)
def test_quantize_act_each_config(config):
    # Every shipped config (the launcher picks q64 only past 2048 tokens).
    M, K, r = 70, 128, 48
    x = _activations((M,), K, torch.bfloat16, False, seed=1)
    smooth, L_down = _smooth(K, 2), _L_down(r, K, torch.bfloat16, seed=2)
    xq, xs, la = _cpu(tq.lowrank_quantize_act(*_dev(x, smooth, L_down), False, config=config))
    rq, rs, rla = _on("reference", lowrank_quantize_act, x, smooth, L_down, unsigned=False)
    assert torch.equal(xq, rq) and torch.equal(xs, rs)
    _check_lowrank_act(la, rla, x, L_down)


@needs_kernels
def test_quantize_act_strided_x():
    # x: every other column of a wider buffer (read in place: the flattened view has
    # strides (2K, 2)); smooth strided too.
    K, r = 128, 16
    x = _activations((3, 5), 2 * K, torch.float16, False, seed=3)[..., ::2]
    smooth = _smooth(2 * K, 4)[::2]
    L_down = _L_down(r, K, torch.float16, seed=3)
    assert x.reshape(-1, K).stride() == (2 * K, 2) and smooth.stride(0) == 2
    (xq, xs, la), (rq, rs, rla) = _quantize_both(x, smooth, L_down, False)
    assert torch.equal(xq, rq) and torch.equal(xs, rs)
    _check_lowrank_act(la, rla, x, L_down)


# ---------------------------------------------------------------- lowrank_w4a4_gemm


def _w4a4_problem(shape, dt, unsigned, seed):
    lead, N, K, r, bias = shape
    qweight, scales, L_down, L_up, b = random_w4a16_layer(N, K, r, dt, bias=bias, seed=seed)
    x = _activations(lead, K, dt, unsigned, seed)
    xq, xs, la = _on("reference", lowrank_quantize_act, x, _smooth(K, seed), L_down, unsigned=unsigned)
    return xq, xs, qweight, scales, la, L_up, b


def _w4a4_mag(xq, xs, qweight, scales, la, L_up, b, unsigned):
    """Absolute sum of the terms: |deq(xq)|·|deq(W)|ᵀ + |lowrank_act|·|L_up|ᵀ + |bias|."""
    G = xs.shape[-1]
    qx = unpack_int4(xq, signed=not unsigned).double().unflatten(-1, (G, GROUP_SIZE))
    X = (qx * xs.double()[..., None]).flatten(-2)
    mag = X.abs() @ dequantize_weight(qweight, scales, dtype=torch.float64).abs().T
    mag = mag + la.double().abs() @ L_up.double().abs().T
    return mag if b is None else mag + b.double().abs()


def _check_w4a4(problem, unsigned, config=None):
    xq, xs, qweight, scales, la, L_up, b = problem
    if config is None:
        y = _on("triton", lowrank_w4a4_gemm, *_dev(xq, xs, qweight, scales), lowrank_act=la.to(DEVICE),
                L_up=L_up.to(DEVICE), bias=_dev(b)[0], unsigned=unsigned)
    else:
        y = _cpu(tq.lowrank_w4a4_gemm(*_dev(xq, xs, qweight, scales, la, L_up, b), unsigned, config=config))
    ref = _on("reference", lowrank_w4a4_gemm, xq, xs, qweight, scales, lowrank_act=la, L_up=L_up, bias=b,
              unsigned=unsigned)
    n = xs.shape[-1] + la.shape[-1] + 2  # float32 terms: the group sums, the rank, the bias
    _assert_within(y, ref, _w4a4_mag(*problem, unsigned), n, scales.dtype)
    return y, ref


@needs_kernels
@pytest.mark.parametrize("unsigned", [False, True], ids=["signed", "unsigned"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_w4a4_gemm(shape, dtype, unsigned):
    _check_w4a4(_w4a4_problem(shape, DTYPES[dtype], unsigned, seed=len(shape[0]) + shape[2]), unsigned)


@needs_kernels
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[2]], ids=_id)
def test_w4a4_gemm_float32(shape):
    _check_w4a4(_w4a4_problem(shape, torch.float32, False, seed=5), False)


@needs_kernels
@pytest.mark.skipif(not triton_interpreted(), reason="the GPU contracts the rescale into an FMA")
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_w4a4_gemm_without_low_rank_is_bit_identical(dtype):
    # Exact int32 group sums, then the reference's own float32 operations in its order.
    shape = ((17,), 72, 320, 0, True)
    y, ref = _check_w4a4(_w4a4_problem(shape, DTYPES[dtype], True, seed=6), True)
    assert torch.equal(y, ref)


@needs_kernels
@pytest.mark.parametrize("config", tq.CONFIGS, ids=lambda c: c.name)
def test_w4a4_gemm_each_config(config):
    # Every shipped config on one shape: 70 tokens, 130 features, ragged tiles in both.
    _check_w4a4(_w4a4_problem(((70,), 130, 128, 32, True), torch.bfloat16, False, seed=7), False, config)


@needs_kernels
def test_w4a4_gemm_strided_activations():
    # xq, xscale, lowrank_act: column slices of wider buffers (any strides are allowed).
    xq, xs, qweight, scales, la, L_up, b = _w4a4_problem(((6,), 40, 128, 16, True), torch.float16, False, 8)
    xq_s = torch.cat([xq, xq], -1)[:, : xq.shape[-1]]
    xs_s = torch.stack([xs, xs], -1)[..., 0]
    la_s = torch.cat([la, la], -1)[:, : la.shape[-1]]
    assert not (xq_s.is_contiguous() or xs_s.is_contiguous() or la_s.is_contiguous())
    _check_w4a4((xq_s, xs_s, qweight, scales, la_s, L_up, b), False)


# ---------------------------------------------------------------- lowrank_w4a16_linear


def _check_w4a16(x, qweight, scales, L_down, L_up, b, config=None):
    if config is None:
        y = _on("triton", lowrank_w4a16_linear, *_dev(x, qweight, scales), L_down=L_down.to(DEVICE),
                L_up=L_up.to(DEVICE), bias=_dev(b)[0])
    else:
        y = _cpu(tq.lowrank_w4a16_linear(*_dev(x, qweight, scales, L_down, L_up, b), config=config))
    ref = _on("reference", lowrank_w4a16_linear, x, qweight, scales, L_down=L_down, L_up=L_up, bias=b)
    x64 = x.double().abs()
    mag = x64 @ dequantize_weight(qweight, scales, dtype=torch.float64).abs().T
    mag = mag + (x64 @ L_down.double().abs().T) @ L_up.double().abs().T
    mag = mag if b is None else mag + b.double().abs()
    _assert_within(y, ref, mag, x.shape[-1] + L_down.shape[0] + 2, x.dtype)
    return y, ref


@needs_kernels
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_w4a16_linear(shape, dtype):
    lead, N, K, r, bias = shape
    dt = DTYPES[dtype]
    qweight, scales, L_down, L_up, b = random_w4a16_layer(N, K, r, dt, bias=bias, seed=K)
    x = _activations(lead, K, dt, False, seed=N)
    _check_w4a16(x, qweight, scales, L_down, L_up, b)


@needs_kernels
@pytest.mark.parametrize("config", tq.CONFIGS, ids=lambda c: c.name)
def test_w4a16_linear_each_config(config):
    qweight, scales, L_down, L_up, b = random_w4a16_layer(130, 128, 32, torch.bfloat16, seed=9)
    x = _activations((70,), 128, torch.bfloat16, False, seed=9)
    _check_w4a16(x, qweight, scales, L_down, L_up, b, config)


@needs_kernels
def test_w4a16_linear_strided_x():
    qweight, scales, L_down, L_up, b = random_w4a16_layer(40, 128, 16, torch.float32, seed=10)
    x = _activations((2, 5), 256, torch.float32, False, seed=10)[..., 1::2]
    assert x.reshape(-1, 128).stride() == (256, 2)  # read in place
    _check_w4a16(x, qweight, scales, L_down, L_up, b)


# ---------------------------------------------------------------- determinism, zeros, empty


@needs_kernels
def test_deterministic():
    # No atomics and a fixed reduction order: two calls agree bit for bit.
    xq, xs, qweight, scales, la, L_up, b = _dev(*_w4a4_problem(((40,), 130, 192, 48, True), torch.bfloat16,
                                                              False, seed=11))
    x = _dev(_activations((40,), 192, torch.bfloat16, False, seed=11))[0]
    L_down = _L_down(48, 192, torch.bfloat16, seed=11).to(DEVICE)
    smooth = _smooth(192, 11).to(DEVICE)

    def run():
        with svdkernels.use_backend("triton"):
            return [*lowrank_quantize_act(x, smooth, L_down),
                    lowrank_w4a4_gemm(xq, xs, qweight, scales, lowrank_act=la, L_up=L_up, bias=b),
                    lowrank_w4a16_linear(x, qweight, scales, L_down=L_down, L_up=L_up, bias=b)]

    assert all(torch.equal(first, second) for first, second in zip(run(), run()))


@needs_kernels
@pytest.mark.parametrize("unsigned", [False, True], ids=["signed", "unsigned"])
def test_zero_groups_give_exact_zeros(unsigned):
    # A zero activation group gets xscale = 0 and q = 0, a zero weight group scale 0:
    # never 0/0, and their products are exact zeros.
    K, N = 192, 40
    zero = -UNSIGNED_SHIFT if unsigned else 0.0  # zero after the unsigned shift
    no_rank = dict(L_down=torch.zeros(0, K, dtype=torch.bfloat16), L_up=torch.zeros(N, 0, dtype=torch.bfloat16))
    x = _activations((5,), K, torch.bfloat16, unsigned, seed=12)
    x[:, 64:128] = zero
    (xq, xs, la), (rq, rs, _) = _quantize_both(x, torch.ones(K), no_rank["L_down"], unsigned)
    assert torch.equal(xq, rq) and torch.equal(xs, rs)
    assert (xs[:, 1] == 0).all() and (xq[:, 32:64] == 0).all()

    def w4a4(xq, xs, qweight, scales):
        return _on("triton", lowrank_w4a4_gemm, *_dev(xq, xs, qweight, scales), lowrank_act=la.to(DEVICE),
                   L_up=no_rank["L_up"].to(DEVICE), unsigned=unsigned)

    W = torch.randn(N, K, generator=torch.Generator().manual_seed(12))
    qweight, scales = quantize_weight(W, dtype=torch.bfloat16)
    zeros = torch.zeros(5, N, dtype=torch.bfloat16)
    # All-zero activations, then an all-zero weight: y = 0 exactly.
    xq0, xs0, _ = _on("triton", lowrank_quantize_act, *_dev(torch.full_like(x, zero), torch.ones(K),
                                                           no_rank["L_down"]), unsigned=unsigned)
    assert torch.equal(w4a4(xq0, xs0, qweight, scales), zeros)
    assert torch.equal(w4a4(xq, xs, *quantize_weight(0 * W, dtype=torch.bfloat16)), zeros)
    # x's zero group 1 against W's zero group 0: finite, and the reference's result.
    qweight, scales = quantize_weight(torch.where(torch.arange(K) < 64, 0.0, W), dtype=torch.bfloat16)
    _check_w4a4((xq, xs, qweight, scales, la, no_rank["L_up"], None), unsigned)
    y16 = _on("triton", lowrank_w4a16_linear, *_dev(torch.zeros(5, K).bfloat16(), qweight, scales),
              **{k: v.to(DEVICE) for k, v in no_rank.items()})
    assert torch.equal(y16, zeros)


@needs_kernels
def test_zero_tokens():
    qweight, scales, L_down, L_up, b = _dev(*random_w4a16_layer(24, 128, 16, torch.bfloat16))
    x = torch.zeros(0, 3, 128, dtype=torch.bfloat16, device=DEVICE)
    with svdkernels.use_backend("triton"):
        xq, xs, la = lowrank_quantize_act(x, torch.ones(128, device=DEVICE), L_down)
        assert xq.shape == (0, 3, 64) and xs.shape == (0, 3, 2) and la.shape == (0, 3, 16)
        y = lowrank_w4a4_gemm(xq, xs, qweight, scales, lowrank_act=la, L_up=L_up, bias=b)
        assert y.shape == (0, 3, 24)
        assert lowrank_w4a16_linear(x, qweight, scales, L_down=L_down, L_up=L_up, bias=b).shape == (0, 3, 24)


@needs_kernels
def test_opcheck():
    # The op contract (schema, fake impl, dispatch) with the triton backend behind it.
    qweight, scales, L_down, L_up, b = _dev(*random_w4a16_layer(24, 128, 16, torch.bfloat16))
    x = _dev(_activations((2, 3), 128, torch.bfloat16, False, seed=13))[0]
    smooth = _smooth(128, 13).to(DEVICE)
    with svdkernels.use_backend("triton"):
        for unsigned in (False, True):
            xq, xs, la = lowrank_quantize_act(x, smooth, L_down, unsigned=unsigned)
            torch.library.opcheck(torch.ops.svdkernels.lowrank_quantize_act.default, (x, smooth, L_down, unsigned))
            torch.library.opcheck(torch.ops.svdkernels.lowrank_w4a4_gemm.default,
                                  (xq, xs, qweight, scales, la, L_up, b, unsigned))
        torch.library.opcheck(torch.ops.svdkernels.lowrank_w4a16_linear.default,
                              (x, qweight, scales, L_down, L_up, b))


def test_cpu_default_is_not_triton(monkeypatch):
    # Triton runs on CPU tensors only when forced; the default there stays cpp/reference.
    def fail(*args, **kwargs):
        raise AssertionError("the triton backend ran on a CPU default")

    for name in ("lowrank_quantize_act", "lowrank_w4a4_gemm", "lowrank_w4a16_linear"):
        monkeypatch.setattr(tq, name, fail)
    qweight, scales, L_down, L_up, b = random_w4a16_layer(24, 128, 16, torch.float32)
    x = torch.randn(2, 128)
    xq, xs, la = lowrank_quantize_act(x, torch.ones(128), L_down)
    lowrank_w4a4_gemm(xq, xs, qweight, scales, lowrank_act=la, L_up=L_up, bias=b)
    lowrank_w4a16_linear(x, qweight, scales, L_down=L_down, L_up=L_up, bias=b)


def test_pick_config():
    assert tq.pick_config(1).name == "decode" and tq.pick_config(16).name == "decode"
    assert tq.pick_config(17).name == "mid" and tq.pick_config(64).name == "mid"
    assert tq.pick_config(65).name == "prefill"
    assert tq.pick_quant_config(2048).name == "q16" and tq.pick_quant_config(2049).name == "q64"


# ------------------------------------------- compile cases (built by tests/triton/test_compile.py)


CASES = list(tq.compile_cases())


def test_compile_cases_cover_every_kernel_config_and_dtype():
    ids = {case.id for case in CASES}
    assert len(ids) == len(CASES)
    for dtype in ("bf16", "fp16", "fp32"):
        for cfg in tq.CONFIGS:
            assert {f"w4a4-{cfg.name}-{dtype}", f"w4a4-{cfg.name}-{dtype}-unsigned",
                    f"w4a16-{cfg.name}-{dtype}"} <= ids
        for cfg in tq.QUANT_CONFIGS:
            assert {f"quantize-{cfg.name}-{dtype}", f"quantize-{cfg.name}-{dtype}-unsigned",
                    f"down-{cfg.name}-{dtype}"} <= ids
    for case in CASES:  # built with the launchers' options
        cfg = next(c for c in tq.CONFIGS + tq.QUANT_CONFIGS if c.name == case.id.split("-")[1])
        assert case.options == {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}, case.id
        assert case.constexprs["BLOCK_M"] == cfg.BLOCK_M, case.id
