"""Triton kernels of kron_linear (levels 2 and 3 of DESIGN.md's verification plan).

Level 2: the fused forward kernel and the factor-gradient kernels against the
materialised Kronecker product in float64 (``W = Σ_i A_i ⊗ B_i``, ``y = scale·x·Wᵀ``,
gradients by torch.autograd through it). Without a GPU they run through the Triton
interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1), so sizes are
small; factor dims are not powers of two, token counts not multiples of the token
block, and a small config makes the same shapes span several tiles, chunks and
token splits.

Level 3: every kernel × config × dtype (``compile_cases()``) compiles for sm_80 and
sm_90 with zero spills, fitting shared memory, on the tensor cores. ``pytest -s``
prints registers and shared memory per build.
"""
import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from svdkernels.backends import triton_interpreted  # noqa: E402
from svdkernels.triton import kron_linear as kl  # noqa: E402

RUNS = torch.cuda.is_available() or triton_interpreted()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Tolerance relative to the size of the result: |out - ref| <= TOL·(|ref| + rms(ref)).
TOL = {
    # 3xTF32 keeps ~21 bits per product on the GPU (the interpreter computes in float32).
    "fp32": 1e-5,
    # 8 unit roundoffs (bf16 2^-9, fp16 2^-11): y and the intermediate Z are each rounded
    # to 16 bits, and Z's roundings add up over the a2 terms of the second contraction.
    "bf16": 2**-6,
    "fp16": 2**-8,
}

# Several tiles and chunks along every loop at the small test sizes (not one of CONFIGS).
SMALL = kl.Config("small", 16, BLOCK_T=2, BLOCK_A1=16, BLOCK_A2=16, BLOCK_B1=16, BLOCK_B2=16,
                  num_warps=4)

SCALE = 0.37

needs_kernels = pytest.mark.skipif(not RUNS, reason="needs CUDA or TRITON_INTERPRET=1")


def _randn(*shape: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


def _problem(N, r, a1, a2, b1, b2, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = _randn(N, a2 * b2, dtype=dtype, g=g)
    A = _randn(r, a1, a2, dtype=dtype, g=g)
    B = _randn(r, b1, b2, dtype=dtype, g=g)
    G = _randn(N, a1 * b1, dtype=dtype, g=g)
    return x, A, B, G


def _dense(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The oracle the kernels never build: ``Σ_i kron(A_i, B_i)`` in float64."""
    A, B = A.double().cpu(), B.double().cpu()  # (differentiable: the gradient oracle uses it)
    W = torch.zeros(A.shape[1] * B.shape[1], A.shape[2] * B.shape[2], dtype=torch.float64)
    for i in range(A.shape[0]):
        W = W + torch.kron(A[i], B[i])
    return W


def _oracle(x, A, B, scale):
    return scale * x.double().cpu() @ _dense(A, B).T


def _oracle_grads(x, G, A, B, scale):
    """``(∂A, ∂B)`` of ``⟨G, scale·x·Wᵀ⟩`` by autograd through the materialised W."""
    A64 = A.double().cpu().requires_grad_()
    B64 = B.double().cpu().requires_grad_()
    y = scale * x.double().cpu() @ _dense(A64, B64).T
    y.backward(G.double().cpu())
    return A64.grad, B64.grad


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: str) -> None:
    ref = ref.double().cpu()
    rms = ref.pow(2).mean().sqrt().item() if ref.numel() else 0.0
    torch.testing.assert_close(out.double().cpu(), ref, rtol=TOL[dtype], atol=TOL[dtype] * rms)


# N, r, a1, a2, b1, b2: each size class of CONFIGS, dims that are not powers of two,
# N = 1 and N not a multiple of any token block, r = 1 and r > 1.
SHAPES = [
    (7, 1, 3, 5, 6, 7),
    (7, 3, 3, 5, 6, 7),
    (1, 2, 4, 16, 4, 9),
    (13, 2, 20, 17, 9, 24),
    (3, 1, 64, 24, 20, 64),
]


def _id(shape):
    N, r, a1, a2, b1, b2 = shape
    return f"N{N}-r{r}-A{a1}x{a2}-B{b1}x{b2}"


def _params(shapes):
    return [pytest.param(s, dt, id=f"{_id(s)}-{dt}") for s in shapes for dt in DTYPES]


# ---------------------------------------------------------------- forward


@needs_kernels
@pytest.mark.parametrize("shape, dtype", _params(SHAPES))
def test_forward(shape, dtype):
    x, A, B, _ = _problem(*shape, DTYPES[dtype], seed=sum(shape))
    y = kl.kron_linear(x, A, B, SCALE)
    N, _, a1, _, b1, _ = shape
    assert y.shape == (N, a1 * b1) and y.dtype == DTYPES[dtype] and y.is_contiguous()
    _assert_close(y, _oracle(x, A, B, SCALE), dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_forward_many_tiles(dtype):
    # 16-wide tiles on 33 x 20 / 18 x 37 factors: 3 tiles of a1, 2 of b1, 2 chunks of
    # a2 and 3 of b2, each with a ragged last one; 5 tokens in blocks of 2.
    shape = (5, 2, 33, 20, 18, 37)
    x, A, B, _ = _problem(*shape, DTYPES[dtype], seed=3)
    _assert_close(kl.kron_linear(x, A, B, SCALE, config=SMALL), _oracle(x, A, B, SCALE), dtype)


@needs_kernels
@pytest.mark.parametrize("config", kl.CONFIGS["forward"], ids=lambda c: c.name)
def test_forward_each_config(config):
    # Every shipped config on one shape (BLOCK_T = 1 in f128, tiles wider than the dims).
    shape = (5, 2, 20, 37, 33, 18)
    x, A, B, _ = _problem(*shape, torch.float32, seed=4)
    _assert_close(kl.kron_linear(x, A, B, SCALE, config=config), _oracle(x, A, B, SCALE), "fp32")


@needs_kernels
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_forward_strided_operands(dtype):
    # x: every other column of a wider buffer (row stride 2·a2·b2 + 3, column stride 2);
    # A, B: transposed views (unit stride along the rows), read without a copy.
    N, r, a1, a2, b1, b2 = 6, 2, 5, 7, 9, 4
    g = torch.Generator().manual_seed(5)
    dt = DTYPES[dtype]
    x = _randn(N, 2 * a2 * b2 + 3, dtype=dt, g=g)[:, : 2 * a2 * b2 : 2]
    A = _randn(r, a2, a1, dtype=dt, g=g).mT
    B = _randn(r, b2, b1, dtype=dt, g=g).mT
    assert x.stride() == (2 * a2 * b2 + 3, 2) and A.stride(-2) == 1 and B.stride(-2) == 1
    _assert_close(kl.kron_linear(x, A, B, SCALE), _oracle(x, A, B, SCALE), dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_grad_x_is_forward_with_transposed_factors(dtype):
    # ∂x = kron_linear(G, Aᵀ, Bᵀ): G·W = scale·G·(Σ Aᵢ ⊗ Bᵢ), with stride-swapped factors.
    shape = (7, 3, 3, 5, 6, 7)
    x, A, B, G = _problem(*shape, DTYPES[dtype], seed=6)
    grad_x = kl.kron_linear(G, A.mT, B.mT, SCALE)
    assert grad_x.shape == x.shape
    _assert_close(grad_x, SCALE * G.double().cpu() @ _dense(A, B), dtype)


# ---------------------------------------------------------------- factor gradients


@needs_kernels
@pytest.mark.parametrize("shape, dtype", _params(SHAPES))
def test_factor_grads(shape, dtype):
    x, A, B, G = _problem(*shape, DTYPES[dtype], seed=sum(shape) + 1)
    grad_A, grad_B = kl.kron_linear_factor_grads(x, G, A, B, SCALE)
    assert grad_A.shape == A.shape and grad_A.dtype == A.dtype
    assert grad_B.shape == B.shape and grad_B.dtype == B.dtype
    ref_A, ref_B = _oracle_grads(x, G, A, B, SCALE)
    _assert_close(grad_A, ref_A, dtype)
    _assert_close(grad_B, ref_B, dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_factor_grads_many_tiles_and_splits(dtype):
    # 5 tokens in blocks of 2: 3 blocks in 2 splits of 2 and 1 (summed by the launcher);
    # every factor dim spans several 16-wide tiles or chunks with a ragged last one.
    shape = (5, 2, 20, 18, 17, 37)
    x, A, B, G = _problem(*shape, DTYPES[dtype], seed=7)
    grad_A, grad_B = kl.kron_linear_factor_grads(x, G, A, B, SCALE, config_a=SMALL, config_b=SMALL,
                                                 splits=2)
    ref_A, ref_B = _oracle_grads(x, G, A, B, SCALE)
    _assert_close(grad_A, ref_A, dtype)
    _assert_close(grad_B, ref_B, dtype)


@needs_kernels
@pytest.mark.parametrize("index", range(len(kl.CONFIGS["grad_a"])),
                         ids=[c.name for c in kl.CONFIGS["grad_a"]])
def test_factor_grads_each_config(index):
    shape = (5, 2, 20, 17, 18, 24)
    x, A, B, G = _problem(*shape, torch.float32, seed=8)
    grad_A, grad_B = kl.kron_linear_factor_grads(
        x, G, A, B, SCALE, config_a=kl.CONFIGS["grad_a"][index], config_b=kl.CONFIGS["grad_b"][index])
    ref_A, ref_B = _oracle_grads(x, G, A, B, SCALE)
    _assert_close(grad_A, ref_A, "fp32")
    _assert_close(grad_B, ref_B, "fp32")


@needs_kernels
def test_factor_grads_strided_inputs():
    # x and grad_y as column slices of wider buffers, A and B transposed views.
    N, r, a1, a2, b1, b2 = 5, 2, 6, 3, 4, 7
    g = torch.Generator().manual_seed(9)
    x = _randn(N, a2 * b2 + 5, dtype=torch.float32, g=g)[:, 2: 2 + a2 * b2]
    G = _randn(N, 2 * a1 * b1, dtype=torch.float32, g=g)[:, ::2]
    A = _randn(r, a2, a1, dtype=torch.float32, g=g).mT
    B = _randn(r, b2, b1, dtype=torch.float32, g=g).mT
    grad_A, grad_B = kl.kron_linear_factor_grads(x, G, A, B, SCALE)
    ref_A, ref_B = _oracle_grads(x, G, A, B, SCALE)
    _assert_close(grad_A, ref_A, "fp32")
    _assert_close(grad_B, ref_B, "fp32")


# ---------------------------------------------------------------- edges and errors


@needs_kernels
def test_empty_inputs():
    def zeros(*shape):
        return torch.zeros(*shape, device=DEVICE)

    y = kl.kron_linear(zeros(0, 12), zeros(2, 5, 3), zeros(2, 6, 4), 1.0)
    assert y.shape == (0, 30)
    # No factors: a zero map; factors with a zero dim: zero gradients of that shape.
    assert not kl.kron_linear(torch.ones(3, 12, device=DEVICE), zeros(0, 5, 3), zeros(0, 6, 4), 1.0).any()
    gA, gB = kl.kron_linear_factor_grads(zeros(0, 12), zeros(0, 30), zeros(2, 5, 3), zeros(2, 6, 4), 1.0)
    assert gA.shape == (2, 5, 3) and gB.shape == (2, 6, 4) and not gA.any() and not gB.any()


@needs_kernels
def test_errors_name_the_argument():
    def zeros(*shape, dtype=torch.float32):
        return torch.zeros(*shape, dtype=dtype, device=DEVICE)

    x, A, B = zeros(3, 12), zeros(2, 5, 3), zeros(2, 6, 4)
    with pytest.raises(ValueError, match="x: expected shape"):
        kl.kron_linear(zeros(3, 13), A, B, 1.0)
    with pytest.raises(ValueError, match="A: expected a 3-D"):
        kl.kron_linear(x, A[0], B, 1.0)
    with pytest.raises(ValueError, match="B: expected 2 factors"):
        kl.kron_linear(x, A, B[:1], 1.0)
    with pytest.raises(ValueError, match="x: expected a 2-D"):
        kl.kron_linear(x[None], A, B, 1.0)
    with pytest.raises(TypeError, match="x: expected one of"):
        kl.kron_linear(x.double(), A, B, 1.0)
    with pytest.raises(ValueError, match="grad_y: expected shape"):
        kl.kron_linear_factor_grads(x, zeros(3, 31), A, B, 1.0)
    with pytest.raises(ValueError, match="grad_y: expected dtype"):
        kl.kron_linear_factor_grads(x, zeros(3, 30, dtype=torch.float16), A, B, 1.0)
    with pytest.raises(ValueError, match="splits"):
        kl.kron_linear_factor_grads(x, zeros(3, 30), A, B, 1.0, splits=0)


def test_pick_config():
    assert kl.pick_config("forward", 3, 5, 6, 7).name == "f16"
    assert kl.pick_config("forward", 3, 5, 6, 17).name == "f32"
    assert kl.pick_config("grad_a", 64, 2, 2, 2).name == "f64"
    assert kl.pick_config("grad_b", 1000, 2, 2, 2).name == "f128"  # the last tiles any size
    # ∂x swaps a1 <-> a2 and b1 <-> b2 and gets the same config.
    assert kl.pick_config("forward", 20, 40, 9, 3) == kl.pick_config("forward", 40, 20, 3, 9)


# ------------------------------------------- compile cases (built by tests/triton/test_compile.py)


CASES = list(kl.compile_cases())


def test_compile_cases_cover_every_kernel_config_and_dtype():
    ids = {case.id for case in CASES}
    assert len(ids) == len(CASES)
    for kernel, configs in kl.CONFIGS.items():
        for cfg in configs:
            for dtype in ("bf16", "fp16", "fp32"):
                assert any(i.startswith(f"{kernel}-{cfg.name}-{dtype}") for i in ids), (kernel, cfg, dtype)
    # Built with the launch options the launchers use (the register cap included).
    for case in CASES:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[case.id.split("-")[2]]
        kernel, name = case.id.split("-")[:2]
        cfg = next(c for c in kl.CONFIGS[kernel] if c.name == name)
        opts = kl._options(dtype, cfg)
        assert case.options == {k: opts[k] for k in ("num_warps", "num_stages", "maxnreg")}, case.id
        assert all(case.constexprs[k] == opts[k] for k in opts if k.startswith("BLOCK") or k == "COMPUTE")
