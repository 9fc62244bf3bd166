"""The C++ rsvd (csrc/cpu/rsvd*.cpp, ``svdkernels.ops.rsvd_cpp``) against the reference
backend (``svdkernels.reference.rsvd``) with the same seed, on every instruction-set
path this CPU runs: batched and unbatched, tall and wide, float32/bfloat16/float16
input, a bfloat16 sketch, ranks that leave remainders in every tile; then seed
reproducibility and thread-count independence, the fallbacks (scaling of tiny and
huge inputs, rank-deficient and all-zero matrices, NaN/Inf raising through the
reference), the public op's dispatch and the internal op's contract.

"Equal to rounding": the same Gaussian test matrix and the same recipe, so the
singular values agree to float32 rounding and the rank-k approximations
``U·diag(S)·Vh`` to a few float32 ulps of ``‖A‖``. A different sketch (another
seed) fails these tolerances (checked below), so they pin the sketch too.

Skipped when svdkernels._C is not built, unless SVDKERNELS_REQUIRE_EXTENSION=1.
"""

import pytest
import torch

import svdkernels
from svdkernels.backends import use_backend
from svdkernels.ops import rsvd_cpp
from svdkernels.reference import rsvd as reference
from svdkernels.testing.matrices import spectral_matrix

from cpp_support import ISA_NAMES, isas, require_extension  # noqa: E402 (tests/cpp on sys.path)

require_extension()

OPS = torch.ops.svdkernels
ISAS = isas()
# (batch, m, n, rank): tall, wide, unbatched, two batch dims; l = rank + 10 = 13, 17, 26, 19.
SHAPES = [((3,), 200, 150, 3), ((), 120, 260, 7), ((2,), 150, 333, 16), ((2, 2), 97, 64, 9)]


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: torch's batched LAPACK calls on tiny matrices (the reference's, and
    the Haar factors of the test matrices) open a parallel region each, which on a
    loaded 2-core machine costs seconds per test. The C++ op's own thread-count
    independence is tested with two threads below."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def poly(batch, m, n, seed=0, dtype=torch.float32):
    """``A`` with σ_i = 1/(i+1) (distinct, decaying: the factors are well determined)."""
    return spectral_matrix("poly", m, n, batch=batch, decay=1.0, seed=seed).A.to(dtype)


def agree(got, want, A, *, s_tol, rec_tol):
    """S to ``s_tol`` relative, ``U·diag(S)·Vh`` to ``rec_tol·‖A‖``, orthonormal factors."""
    (U, S, Vh), (U0, S0, Vh0) = got, want
    assert U.shape == U0.shape and S.shape == S0.shape and Vh.shape == Vh0.shape
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    assert U.is_contiguous() and S.is_contiguous() and Vh.is_contiguous()
    s_err = float(((S.double() - S0.double()).abs() / S0.double()).max())
    rec = lambda U, S, Vh: (U.double() * S.double().unsqueeze(-2)) @ Vh.double()  # noqa: E731
    norm = torch.linalg.matrix_norm(A.double()).max()
    rec_err = float((rec(U, S, Vh) - rec(U0, S0, Vh0)).abs().max() / norm)
    eye = torch.eye(S.shape[-1], dtype=torch.float64)
    orth = max(float((U.double().mT @ U.double() - eye).abs().max()),
               float((Vh.double() @ Vh.double().mT - eye).abs().max()))
    assert s_err <= s_tol, f"S: {s_err:.3g}"
    assert rec_err <= rec_tol, f"U S Vh: {rec_err:.3g}"
    assert orth <= 1e-5, f"orthonormality: {orth:.3g}"


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES.get)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_float32_against_reference(isa, shape):
    batch, m, n, k = shape
    A = poly(batch, m, n, seed=m)
    got = rsvd_cpp.rsvd(A, k, oversample=10, n_iter=2, seed=3, isa=isa)
    agree(got, reference.rsvd(A, k, seed=3), A, s_tol=2e-6, rec_tol=2e-6)


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES.get)
@pytest.mark.parametrize("n_iter", [0, 1, 3])
def test_power_iterations(isa, n_iter):
    A = poly((2,), 180, 140, seed=1)
    got = rsvd_cpp.rsvd(A, 8, oversample=5, n_iter=n_iter, seed=11, isa=isa)
    want = reference.rsvd(A, 8, oversample=5, n_iter=n_iter, seed=11)
    agree(got, want, A, s_tol=2e-6, rec_tol=2e-6)


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES.get)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_input(isa, dtype):
    # bfloat16: sketch and power passes in bfloat16 (rounded as torch.matmul rounds),
    # the last two in float32; float16: every pass in float32 (the CPU's plan).
    A = poly((2,), 160, 120, seed=2, dtype=dtype)
    got = rsvd_cpp.rsvd(A, 6, oversample=10, n_iter=2, seed=5, isa=isa)
    agree(got, reference.rsvd(A, 6, seed=5), A, s_tol=1e-5, rec_tol=1e-5)


def test_cast_workspace_reused_across_sizes():
    # 16-bit input is cast to float32 for the last two passes into a per-thread
    # buffer that later calls reuse (grown for a larger A, narrowed for a smaller
    # one): each call's result is its own, whatever came before.
    shapes = [((2,), 160, 120), ((3,), 200, 150), ((1,), 90, 70), ((2,), 160, 120)]
    for batch, m, n in shapes:
        A = poly(batch, m, n, seed=m, dtype=torch.bfloat16)
        got = rsvd_cpp.rsvd(A, 5, oversample=10, n_iter=2, seed=2)
        agree(got, reference.rsvd(A, 5, seed=2), A, s_tol=1e-5, rec_tol=1e-5)
    assert A.dtype == torch.bfloat16  # the input is never written


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES.get)
def test_bfloat16_sketch_of_float32(isa):
    # The plan of CPUs with native bfloat16 products (AVX512-BF16/AMX), forced here.
    A = poly((2,), 160, 200, seed=4)
    got = rsvd_cpp.rsvd(A, 8, oversample=10, n_iter=2, seed=6, sketch_dtype=torch.bfloat16, isa=isa)
    agree(got, reference.rsvd(A, 8, seed=6, sketch_dtype=torch.bfloat16), A, s_tol=1e-5, rec_tol=1e-5)


def test_a_different_sketch_would_fail_these_tolerances():
    # The tolerances above detect a sketch that is not the reference's.
    A = poly((2,), 150, 333, seed=150)
    got = rsvd_cpp.rsvd(A, 16, oversample=10, n_iter=2, seed=3)
    with pytest.raises(AssertionError):
        agree(got, reference.rsvd(A, 16, seed=4), A, s_tol=2e-6, rec_tol=2e-6)


@pytest.mark.parametrize("batch", [4, 5])
def test_seed_reproducible_and_thread_count_independent(batch):
    # With two threads a batch of 4 runs each thread's matrices start to end (one
    # parallel region), a batch of 5 the batched passes; one thread runs the latter.
    A = poly((batch,), 130, 90, seed=9)
    serial = rsvd_cpp.rsvd(A, 8, oversample=10, n_iter=2, seed=123)
    want = reference.rsvd(A, 8, seed=123)
    torch.set_num_threads(2)  # the fixture restores the count
    one = rsvd_cpp.rsvd(A, 8, oversample=10, n_iter=2, seed=123)
    other = rsvd_cpp.rsvd(A, 8, oversample=10, n_iter=2, seed=124)
    for a, b in zip(one, serial):
        assert torch.equal(a, b)
    assert torch.equal(one[1], rsvd_cpp.rsvd(A, 8, oversample=10, n_iter=2, seed=123)[1])
    assert not torch.equal(one[0], other[0])
    agree(one, want, A, s_tol=2e-6, rec_tol=2e-6)
    # Negative seeds are int64 seeds as torch.Generator.manual_seed takes them.
    agree(rsvd_cpp.rsvd(A, 8, oversample=10, n_iter=2, seed=-7), reference.rsvd(A, 8, seed=-7), A,
          s_tol=2e-6, rec_tol=2e-6)


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES.get)
@pytest.mark.parametrize("scale", [1e-30, 1e18, 2.0**-70])
def test_scale_invariant(isa, scale):
    # Grams outside float32's comfortable range take the power-of-two scaling path.
    A = poly((2,), 140, 100, seed=3)
    base = rsvd_cpp.rsvd(A, 6, oversample=10, n_iter=2, seed=1, isa=isa)
    U, S, Vh = rsvd_cpp.rsvd(A * scale, 6, oversample=10, n_iter=2, seed=1, isa=isa)
    assert torch.allclose(S.double() / scale, base[1].double(), rtol=1e-5, atol=0)
    agree((U, S / scale, Vh), base, A, s_tol=1e-5, rec_tol=1e-5)


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES.get)
def test_rank_deficient_and_zero(isa):
    g = torch.Generator().manual_seed(0)
    # Exact rank 3 < l = 15: the Grams are singular and take the shifted Cholesky.
    A = torch.randn(2, 120, 3, generator=g) @ torch.randn(2, 3, 90, generator=g)
    U, S, Vh = rsvd_cpp.rsvd(A, 5, oversample=10, n_iter=2, seed=2, isa=isa)
    U0, S0, Vh0 = reference.rsvd(A, 5, seed=2)
    assert torch.allclose(S[:, :3], S0[:, :3], rtol=1e-5)
    assert float(S[:, 3:].abs().max()) <= 1e-5 * float(S[:, 0].min())
    rec = (U[..., :3] * S[:, None, :3]) @ Vh[:, :3]
    assert float((rec - A).abs().max()) <= 1e-5 * float(A.abs().max())
    Z = torch.zeros(2, 64, 48)
    U, S, Vh = rsvd_cpp.rsvd(Z, 4, oversample=10, n_iter=2, seed=0, isa=isa)
    assert torch.equal(S, torch.zeros(2, 4)) and torch.equal(U, torch.zeros(2, 64, 4))
    assert torch.equal(Vh, torch.zeros(2, 4, 48))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input_raises_naming_A(value):
    A = poly((3,), 80, 60, seed=1)
    A[1, 5, 7] = value
    with pytest.raises(ValueError, match=r"^A: expected finite entries.*\[1\]"):
        rsvd_cpp.rsvd(A, 4, oversample=10, n_iter=2, seed=0)
    _, status = OPS._cpp_rsvd(A, 4, 14, 2, 0, torch.float32, -1)[2:]
    assert status > 0


def test_failed_factorisation_reruns_the_reference():
    # One entry near float32's maximum: the basis Grams overflow float32 (the C++ op
    # scales them) and the bases are so ill-conditioned that a float32 Gram stays
    # indefinite after the shift. The C++ op reports it (status > 0) and the call is
    # rerun on the reference, so the result is the reference's, bit for bit.
    A = poly((1,), 100, 80, seed=5)
    A[0, 3, 5] = 3e37
    assert OPS._cpp_rsvd(A, 4, 14, 2, 0, torch.float32, -1)[3] > 0
    U, S, Vh = rsvd_cpp.rsvd(A, 4, oversample=10, n_iter=2, seed=0)
    assert abs(float(S[0, 0]) / 3e37 - 1) < 1e-6
    for a, b in zip((U, S, Vh), reference.rsvd(A, 4, seed=0)):
        assert torch.equal(a, b)


def test_public_op_dispatches_plain_cpu_calls_to_cpp():
    A = poly((2,), 150, 120, seed=7)
    cpp = rsvd_cpp.rsvd(A, 8, oversample=10, n_iter=2, seed=0)
    for got in (svdkernels.rsvd(A, 8, seed=0), torch.ops.svdkernels.rsvd(A, 8, 10, 2, 0, None)):
        for a, b in zip(got, cpp):
            assert torch.equal(a, b)
    with use_backend("cpp"):
        assert torch.equal(svdkernels.rsvd(A, 8, seed=0)[0], cpp[0])
    with use_backend("reference"):
        ref = svdkernels.rsvd(A, 8, seed=0)
    for a, b in zip(ref, reference.rsvd(A, 8, seed=0)):
        assert torch.equal(a, b)
    # Calls the C++ op does not cover run the reference (bit for bit)...
    for public, ref_kwargs in (({"method": "krylov"}, None), ({"center": True}, {"center": "columns"}),
                               ({"tol": 1e-2}, None), ({"oversample": 200}, None)):
        got = svdkernels.rsvd(A, 8, seed=0, **public)
        assert torch.equal(got[1], reference.rsvd(A, 8, seed=0, **(ref_kwargs or public))[1])
    assert torch.equal(svdkernels.rsvd(A.double(), 8, seed=0)[1], reference.rsvd(A.double(), 8, seed=0)[1])
    # ... unless cpp is forced.
    with use_backend("cpp"), pytest.raises(RuntimeError, match="cpp backend"):
        svdkernels.rsvd(A.double(), 8, seed=0)


def test_internal_op_contract():
    A = poly((2,), 60, 50, seed=0)
    with pytest.raises(TypeError, match="A: expected dtype float32, bfloat16 or float16"):
        OPS._cpp_rsvd(A.double(), 4, 14, 2, 0, torch.float32, -1)
    with pytest.raises(ValueError, match=r"A: expected \[B, m, n\]"):
        OPS._cpp_rsvd(A[0], 4, 14, 2, 0, torch.float32, -1)
    with pytest.raises(ValueError, match="rank, width"):
        OPS._cpp_rsvd(A, 4, 50, 2, 0, torch.float32, -1)
    with pytest.raises(ValueError, match="rank, width"):
        OPS._cpp_rsvd(A, 0, 10, 2, 0, torch.float32, -1)
    with pytest.raises(ValueError, match="n_iter"):
        OPS._cpp_rsvd(A, 4, 14, -1, 0, torch.float32, -1)
    with pytest.raises(TypeError, match="sketch_dtype"):
        OPS._cpp_rsvd(A, 4, 14, 2, 0, torch.float64, -1)
    with pytest.raises(ValueError, match="isa"):
        OPS._cpp_rsvd(A, 4, 14, 2, 0, torch.float32, OPS._cpp_best_isa() + 1)
    U, S, Vh, status = OPS._cpp_rsvd(A[:0], 4, 14, 2, 0, torch.float32, -1)
    assert (U.shape, S.shape, Vh.shape, status) == ((0, 60, 4), (0, 4), (0, 4, 50), 0)
