"""Triton kernels of rsvd against torch (level 2 of DESIGN.md's verification plan).

Without a GPU they run through the Triton interpreter on CPU tensors (tests/conftest.py
sets TRITON_INTERPRET=1 before triton is imported); sizes are small because the
interpreter is slow. Shapes are not multiples of the block sizes; a small config
and forced K splits make the same shapes span several tiles and splits.
"""
import math

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from svdkernels.backends import triton_interpreted  # noqa: E402

if not (torch.cuda.is_available() or triton_interpreted()):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from svdkernels.testing.matrices import relative_errors, spectral_matrix  # noqa: E402
from svdkernels.triton import rsvd as tr  # noqa: E402

DEVICE = "cpu" if triton_interpreted() else "cuda"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Several row, column and K tiles at the small test sizes (not one of CONFIGS).
SMALL = tr.Config("small", BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=1, num_stages=1)

# Relative to sqrt(K), the size of an entry of a product of N(0,1) matrices.
# bf16/fp16: the reference rounds the operands exactly as the kernel does (RNE), so
# only the order of the float32 accumulation differs. fp32: tf32x3 keeps ~21 bits
# per product on the GPU (the interpreter computes in float32 outright).
TOL = 1e-5


def _operand(
    B: int, rows: int, cols: int, layout: str, dtype: torch.dtype, g: torch.Generator
) -> torch.Tensor:
    """``[B, rows, cols]`` N(0, 1) in ``dtype``, stored as ``layout`` says."""
    if layout == "contiguous":
        t = torch.randn(B, rows, cols, generator=g)
    elif layout == "mT":  # a transposed view: unit stride along the rows
        t = torch.randn(B, cols, rows, generator=g).mT
    elif layout == "strided":  # every other column of a wider matrix: no unit stride
        t = torch.randn(B, rows, 2 * cols, generator=g)[:, :, ::2]
    else:
        raise ValueError(layout)
    return t.to(dtype).to(DEVICE)


def _reference(A: torch.Tensor, X: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``A·X`` of the operands rounded to ``dtype``, in float64."""
    return A.to(dtype).double() @ X.to(dtype).double()


def _assert_product_close(out: torch.Tensor, ref: torch.Tensor, inner: int) -> None:
    scale = math.sqrt(max(inner, 1))
    torch.testing.assert_close(out.double(), ref, rtol=TOL, atol=TOL * scale)


MATMUL_SHAPES = [
    # B, m, n, w, transpose, layout of A
    (1, 37, 100, 13, False, "contiguous"),
    (2, 100, 37, 26, True, "contiguous"),
    (3, 64, 64, 1, False, "mT"),
    (2, 100, 64, 13, True, "mT"),
    (1, 1, 37, 26, False, "strided"),
    (2, 37, 1, 13, True, "strided"),
]


@pytest.mark.parametrize(
    "B, m, n, w, transpose, layout, dtype",
    [
        pytest.param(B, m, n, w, t, lay, dt, id=f"B{B}-m{m}-n{n}-w{w}-{'At' if t else 'A'}-{lay}-{dt}")
        for (B, m, n, w, t, lay) in MATMUL_SHAPES
        for dt in DTYPES
    ],
)
def test_matmul(B, m, n, w, transpose, layout, dtype):
    g = torch.Generator().manual_seed(B * 1000 + m + n + w)
    A = _operand(B, m, n, layout, torch.float32, g)
    inner = m if transpose else n
    X = _operand(B, inner, w, "contiguous", torch.float32, g)
    out = tr.matmul(A, X, transpose=transpose, dtype=DTYPES[dtype])
    assert out.shape == (B, n if transpose else m, w) and out.dtype == torch.float32
    _assert_product_close(out, _reference(A.mT if transpose else A, X, DTYPES[dtype]), inner)


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("transpose", [False, True], ids=["A", "At"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_matmul_many_tiles(dtype, transpose, split_k):
    # 100 x 100 in 16 x 16 tiles: partial tiles in every direction; 3 K splits of 48, 48, 4.
    B, m, n, w = 2, 100, 100, 26
    g = torch.Generator().manual_seed(7)
    A = _operand(B, m, n, "mT", torch.float32, g)
    X = _operand(B, m if transpose else n, w, "mT", torch.float32, g)  # X strided too
    out = tr.matmul(A, X, transpose=transpose, dtype=DTYPES[dtype], config=SMALL, split_k=split_k)
    _assert_product_close(out, _reference(A.mT if transpose else A, X, DTYPES[dtype]), m)


@pytest.mark.parametrize(
    "a_dtype, x_dtype, dtype",
    [
        ("bf16", "bf16", "bf16"),  # the split projection pass of bfloat16 input
        ("fp16", "fp32", "fp16"),
        ("bf16", "fp32", "fp32"),  # a 16-bit A read in float32
        ("fp32", "fp32", "fp16"),
    ],
    ids=lambda v: v,
)
def test_matmul_storage_dtypes(a_dtype, x_dtype, dtype):
    g = torch.Generator().manual_seed(11)
    A = _operand(2, 37, 64, "contiguous", DTYPES[a_dtype], g)
    X = _operand(2, 64, 13, "contiguous", DTYPES[x_dtype], g)
    out = tr.matmul(A, X, transpose=False, dtype=DTYPES[dtype])
    _assert_product_close(out, _reference(A, X, DTYPES[dtype]), 64)


def test_matmul_empty_and_errors():
    def zeros(*shape):
        return torch.zeros(*shape, device=DEVICE)

    A = zeros(2, 0, 5)
    assert tr.matmul(A, zeros(2, 5, 3), transpose=False, dtype=torch.float32).shape == (2, 0, 3)
    # An empty reduction is a zero product.
    out = tr.matmul(A, zeros(2, 0, 3), transpose=True, dtype=torch.float32)
    assert out.shape == (2, 5, 3) and not out.any()
    with pytest.raises(ValueError, match="X: expected shape"):
        tr.matmul(zeros(2, 4, 5), zeros(2, 4, 3), transpose=False, dtype=torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        tr.matmul(zeros(1, 4, 5), zeros(1, 5, 3), transpose=False, dtype=torch.float64)
    with pytest.raises(ValueError, match="BLOCK_N"):
        tr.sketch(zeros(1, 4, 5), 3, 0, torch.float32, config=tr.Config("odd", 16, 18, 16, 1, 1))


SKETCH_SHAPES = [
    # B, m, n, w, layout of A
    (1, 37, 100, 13, "contiguous"),
    (2, 100, 37, 26, "mT"),
    (3, 64, 1, 1, "contiguous"),
    (1, 1, 64, 26, "strided"),
]


@pytest.mark.parametrize(
    "B, m, n, w, layout, dtype",
    [
        pytest.param(B, m, n, w, lay, dt, id=f"B{B}-m{m}-n{n}-w{w}-{lay}-{dt}")
        for (B, m, n, w, lay) in SKETCH_SHAPES
        for dt in DTYPES
    ],
)
def test_sketch_is_A_times_gaussian(B, m, n, w, layout, dtype):
    g = torch.Generator().manual_seed(m + n)
    A = _operand(B, m, n, layout, torch.float32, g)
    Y = tr.sketch(A, w, 1234, DTYPES[dtype])
    assert Y.shape == (B, m, w) and Y.dtype == torch.float32
    _assert_product_close(Y, _reference(A, tr.gaussian(1234, B, n, w, DEVICE), DTYPES[dtype]), n)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_sketch_many_tiles(dtype):
    B, m, n, w = 2, 100, 100, 26
    A = _operand(B, m, n, "contiguous", torch.float32, torch.Generator().manual_seed(5))
    Y = tr.sketch(A, w, 99, DTYPES[dtype], config=SMALL, split_k=3)
    _assert_product_close(Y, _reference(A, tr.gaussian(99, B, n, w, DEVICE), DTYPES[dtype]), n)


# ---------------------------------------------------------------- the Gaussian Ω


def test_gaussian_is_deterministic_and_independent():
    omega = tr.gaussian(7, 3, 50, 26, DEVICE)
    assert omega.shape == (3, 50, 26) and omega.dtype == torch.float32
    assert torch.equal(omega, tr.gaussian(7, 3, 50, 26, DEVICE))
    other_seed = tr.gaussian(8, 3, 50, 26, DEVICE)
    assert (omega == other_seed).float().mean() < 0.01
    # Batch elements are independent streams: uncorrelated, not shifted copies.
    flat = omega.reshape(3, -1).double()
    corr = torch.corrcoef(flat)
    assert (corr - torch.eye(3, dtype=torch.float64)).abs().max() < 0.15  # 1300 samples: sd 0.028
    assert (omega[0] == omega[1]).float().mean() < 0.01
    # A narrower sketch is a prefix of a wider one (Ω does not depend on the width).
    assert torch.equal(tr.gaussian(7, 3, 50, 13, DEVICE), omega[..., :13])


def test_gaussian_moments():
    x = tr.gaussian(2024, 2, 100, 20, DEVICE).double().flatten()  # 4000 samples
    # Standard errors: mean 0.016, std 0.011, kurtosis ~0.08: bounds are ~5 sigma.
    assert abs(x.mean()) < 0.08
    assert abs(x.std() - 1) < 0.06
    assert abs((x**4).mean() / x.var() ** 2 - 3) < 0.4


M32 = 0xFFFFFFFF


def _philox4x32_10(ctr: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """Philox4x32-10 (Salmon et al. 2011, Random123), in Python integers."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def test_philox_reference_known_answers():
    # Known-answer vectors of Random123 (kat_vectors, philox4x32_10).
    assert _philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert _philox4x32_10((M32,) * 4, (M32, M32)) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)


def _omega_entry(seed: int, b: int, j: int, c: int) -> float:
    """Ω_b[j, c] as the module docstring of svdkernels.triton.rsvd defines it."""
    seed %= 2**64
    r = _philox4x32_10((j, c // 4, b, 0), (seed & M32, seed >> 32))
    pair = c % 4 // 2
    r_radius, r_angle = r[2 * pair], r[2 * pair + 1]
    radius = math.sqrt(-2 * math.log(((r_radius >> 8) + 1) / 2**24))
    angle = math.pi / 2 * ((r_angle >> 30) + ((r_angle >> 6) & 0xFFFFFF) / 2**24 - 0.5)
    return radius * (math.cos(angle) if c % 2 == 0 else math.sin(angle))


@pytest.mark.parametrize("seed", [0, 2**40 + 5, 2**64 - 1, -1], ids=lambda s: f"seed{s}")
def test_gaussian_matches_documented_philox_mapping(seed):
    B, n, w = 3, 40, 13
    omega = tr.gaussian(seed, B, n, w, DEVICE).cpu()
    picks = [(b, j, c) for b in range(B) for j in (0, 1, 17, n - 1) for c in range(w)]
    got = torch.tensor([omega[p].item() for p in picks], dtype=torch.float64)
    want = torch.tensor([_omega_entry(seed, *p) for p in picks], dtype=torch.float64)
    # Ω is rounded to TF32 (11 significant bits): one TF32 ulp is 2^-10 relative.
    torch.testing.assert_close(got, want, rtol=2**-10, atol=1e-6)


# ---------------------------------------------------------------- the whole rsvd


@pytest.mark.parametrize(
    "dtype, sketch_dtype",
    [(torch.float32, None), (torch.float32, torch.float32), (torch.bfloat16, None)],
    ids=["fp32", "fp32-sketch-fp32", "bf16"],
)
def test_rsvd_reaches_optimal_error(dtype, sketch_dtype):
    M = spectral_matrix("exp", 100, 64, batch=(2,), seed=1)
    A = M.A.to(dtype).to(DEVICE)
    A64 = A.double().cpu()
    U, S, Vh = tr.rsvd(A, 8, oversample=10, n_iter=2, seed=3, sketch_dtype=sketch_dtype)
    assert U.shape == (2, 100, 8) and S.shape == (2, 8) and Vh.shape == (2, 8, 64)
    e = relative_errors(A64, U.cpu(), S.cpu(), Vh.cpu(), torch.linalg.svdvals(A64))
    assert e["ratio"].max() <= 1.01, e["ratio"]
