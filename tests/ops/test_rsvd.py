"""rsvd: contract, accuracy against the optimal rank-k error, determinism, errors.

Accuracy bounds are the issue's acceptance bounds at default settings
(oversample=10, n_iter=2): error ratio <= 1.01, top k/2 singular values within
1e-3 relative on polynomial decay d=1.
"""
import pytest
import torch

import svdkernels
from svdkernels.testing.matrices import SpectralMatrix, relative_errors, spectral_matrix
from svdkernels.reference import rsvd as reference
from svdkernels.testing.errors import assert_raises_naming

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Orthonormality of float32 factors: a few ulps times sqrt(k) in Frobenius norm.
ORTH_TOL = 1e-4


def svd_lowrank_ratio(A: torch.Tensor, A_exact: torch.Tensor, rank: int, S_true: torch.Tensor) -> torch.Tensor:
    """``[*batch]`` error ratio of the peer ``torch.svd_lowrank`` at our sketch size,
    run on ``A`` and measured against ``A_exact`` (the matrix ours is measured against)."""
    torch.manual_seed(0)  # svd_lowrank draws from the global generator
    U, S, V = torch.svd_lowrank(A, q=rank + 10, niter=2)
    return relative_errors(A_exact, U[..., :rank], S[..., :rank], V[..., :rank].mT, S_true)["ratio"]


@pytest.fixture(scope="module")
def spectra() -> dict[str, SpectralMatrix]:
    return {kind: spectral_matrix(kind, 512, 512, batch=(3,), seed=7) for kind in ("exp", "poly", "lowrank_noise")}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "kind,rank", [("exp", 32), ("poly", 32), ("lowrank_noise", 10)],
    ids=lambda v: str(v),
)
def test_error_ratio_at_defaults(spectra, kind, rank, device):
    M = spectra[kind]
    U, S, Vh = svdkernels.rsvd(M.A.float().to(device), rank, seed=0)
    e = relative_errors(M.A.to(device), U, S, Vh, M.S.to(device))
    assert e["ratio"].max() <= 1.01, e["ratio"]
    assert e["orth"].max() <= ORTH_TOL, e["orth"]


def test_rank_inside_the_noise_no_worse_than_svd_lowrank(spectra):
    # Asking for rank 32 of a rank-10 + noise matrix approximates the flat noise
    # floor, where any rank-42 sketch with two power steps lands near 1.01 (measured
    # here: torch.svd_lowrank 1.0099-1.0122, ours 1.0104-1.0111 at 512x512). The
    # bound of the issue applies at the matrix's rank (test above); here we require
    # parity with the peer at the same sketch size.
    M = spectra["lowrank_noise"]
    A = M.A.float()
    U, S, Vh = svdkernels.rsvd(A, 32, seed=0)
    ours = relative_errors(M.A, U, S, Vh, M.S)["ratio"].mean()
    peer = svd_lowrank_ratio(A, M.A, 32, M.S).mean()
    assert ours <= peer * 1.002, (ours, peer)


@pytest.mark.parametrize("device", DEVICES)
def test_top_singular_values_poly_decay(spectra, device):
    M = spectra["poly"]
    U, S, Vh = svdkernels.rsvd(M.A.float().to(device), 32, seed=0)
    e = relative_errors(M.A.to(device), U, S, Vh, M.S.to(device))
    assert e["sv"].max() <= 1e-3, e["sv"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["exp", "poly", "lowrank_noise"])
def test_half_precision_input_against_rounded_matrix(spectra, kind, dtype):
    # The bound is measured against the matrix as the caller holds it (rounded).
    A = spectra[kind].A.to(dtype)
    A64 = A.double()
    rank = 10 if kind == "lowrank_noise" else 32
    U, S, Vh = svdkernels.rsvd(A, rank, seed=0)
    e = relative_errors(A64, U, S, Vh, torch.linalg.svdvals(A64))
    assert (U.dtype, S.dtype, Vh.dtype) == (torch.float32,) * 3
    assert e["ratio"].max() <= 1.01, e["ratio"]
    if kind == "poly":
        assert e["sv"].max() <= 1e-3, e["sv"]


def test_float32_sketch_matches_default_mixed_precision(spectra):
    M = spectra["poly"]
    A = M.A.float()
    ratios = []
    for sketch_dtype in (None, torch.float32):
        U, S, Vh = svdkernels.rsvd(A, 32, seed=0, sketch_dtype=sketch_dtype)
        ratios.append(relative_errors(M.A, U, S, Vh, M.S)["ratio"])
    # Same subspace quality to well under the 1% the bound allows.
    torch.testing.assert_close(ratios[0], ratios[1], rtol=2e-3, atol=0)


@pytest.fixture(scope="module")
def minilm_groups() -> list[torch.Tensor]:
    """The 37 linear weights of all-MiniLM-L6-v2 stacked by shape (3 batches)."""
    from svdkernels.testing.models import minilm_linear_weights

    groups: dict[tuple[int, int], list[torch.Tensor]] = {}
    for w in minilm_linear_weights().values():
        groups.setdefault(tuple(w.shape), []).append(w)
    return [torch.stack(ws) for ws in groups.values()]


def test_real_weights_minilm_adapter_rank(minilm_groups):
    # Rank 16, the adapter rank of the workloads (measured here: max 1.0086,
    # torch.svd_lowrank at the same sketch size 1.0092).
    for W in minilm_groups:
        U, S, Vh = svdkernels.rsvd(W, 16, seed=0)
        e = relative_errors(W, U, S, Vh, torch.linalg.svdvals(W.double()))
        assert e["ratio"].max() <= 1.01, e["ratio"]
        assert e["orth"].max() <= ORTH_TOL


@pytest.mark.parametrize("rank", [32, 64])
def test_real_weights_minilm_parity_with_svd_lowrank(minilm_groups, rank):
    # Trained weights have flat spectra: at larger ranks every sketch of rank+10
    # columns with 2 power steps exceeds 1.01 (rank 32: about 1.012 on average, for
    # torch.svd_lowrank too), so here the bar is parity with the peer.
    ours, peer = [], []
    for W in minilm_groups:
        St = torch.linalg.svdvals(W.double())
        U, S, Vh = svdkernels.rsvd(W, rank, seed=0)
        ours.append(relative_errors(W, U, S, Vh, St)["ratio"])
        peer.append(svd_lowrank_ratio(W, W, rank, St))
    assert torch.cat(ours).mean() <= torch.cat(peer).mean() * 1.002


@pytest.mark.parametrize(
    "shape,rank",
    [((40, 30), 5), ((30, 40), 5), ((2, 3, 64, 48), 4), ((1, 100, 20), 1), ((300, 25), 3)],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"k{v}",
)
def test_shapes_dtypes_and_orthonormality(shape, rank):
    A = torch.randn(*shape)
    U, S, Vh = svdkernels.rsvd(A, rank, seed=3)
    *batch, m, n = shape
    assert U.shape == (*batch, m, rank) and S.shape == (*batch, rank) and Vh.shape == (*batch, rank, n)
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in (U, S, Vh))
    assert (S[..., :-1] >= S[..., 1:]).all()
    eye = torch.eye(rank)
    torch.testing.assert_close(U.mT @ U, eye.expand(*batch, rank, rank), atol=ORTH_TOL, rtol=0)
    torch.testing.assert_close(Vh @ Vh.mT, eye.expand(*batch, rank, rank), atol=ORTH_TOL, rtol=0)


def test_exact_fallback_when_sketch_covers_the_matrix():
    A = torch.randn(2, 30, 20, dtype=torch.float64).float()
    U, S, Vh = svdkernels.rsvd(A, 10, oversample=10)  # 10 + 10 >= min(30, 20)
    torch.testing.assert_close(S, torch.linalg.svdvals(A)[..., :10], rtol=1e-5, atol=1e-5)


def test_empty_batch():
    U, S, Vh = svdkernels.rsvd(torch.randn(0, 50, 40), 4)
    assert U.shape == (0, 50, 4) and S.shape == (0, 4) and Vh.shape == (0, 4, 40)


def test_zero_matrix_gives_zero_spectrum_and_no_nan():
    U, S, Vh = svdkernels.rsvd(torch.zeros(2, 64, 48), 4, seed=0)
    assert torch.isfinite(U).all() and torch.isfinite(Vh).all()
    assert (S == 0).all()


def test_same_seed_same_result_different_seed_different_sketch():
    A = torch.randn(2, 80, 60)
    first = svdkernels.rsvd(A, 5, seed=11)
    again = svdkernels.rsvd(A, 5, seed=11)
    other = svdkernels.rsvd(A, 5, seed=12)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])


def test_seed_none_follows_torch_manual_seed():
    A = torch.randn(70, 50)
    torch.manual_seed(5)
    a = svdkernels.rsvd(A, 4)
    torch.manual_seed(5)
    b = svdkernels.rsvd(A, 4)
    assert torch.equal(a[0], b[0])


def test_test_matrix_is_independent_per_batch_element():
    # Identical matrices in one batch: a shared Gaussian would give identical
    # factors; independent ones give different (equally valid) bases.
    A = torch.randn(1, 60, 60).expand(2, 60, 60)
    U, S, Vh = svdkernels.rsvd(A, 4, oversample=2, n_iter=0, seed=0)
    assert not torch.allclose(U[0], U[1])


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda: svdkernels.rsvd(torch.randn(10, 8), 0), ValueError, ["rank", "got 0"]),
        (lambda: svdkernels.rsvd(torch.randn(10, 8), 9), ValueError, ["rank", "min(m, n) = 8", "got 9"]),
        (lambda: svdkernels.rsvd(torch.randn(10), 1), ValueError, ["A", "[..., m, n]", "(10,)"]),
        (lambda: svdkernels.rsvd(torch.ones(10, 8, dtype=torch.int32), 2), TypeError, ["A", "float32", "torch.int32"]),
        (lambda: svdkernels.rsvd(torch.randn(10, 8).to(torch.float8_e4m3fn), 2), TypeError, ["A", "complex64", "torch.float8_e4m3fn"]),
        (lambda: svdkernels.rsvd([[1.0]], 1), TypeError, ["A", "torch.Tensor", "list"]),
        (lambda: svdkernels.rsvd(torch.randn(10, 8), 2.0), TypeError, ["rank", "int", "float"]),
        (lambda: svdkernels.rsvd(torch.randn(10, 8), 2, oversample=-1), ValueError, ["oversample", "-1"]),
        (lambda: svdkernels.rsvd(torch.randn(10, 8), 2, n_iter=-2), ValueError, ["n_iter", "-2"]),
        (lambda: svdkernels.rsvd(torch.randn(10, 8), 2, sketch_dtype=torch.int8), TypeError, ["sketch_dtype", "torch.int8"]),
    ],
    ids=["rank0", "rank-too-big", "1d", "int", "float8", "list", "float-rank", "oversample", "n_iter", "sketch_dtype"],
)
def test_bad_input_names_the_argument(call, exc, words):
    assert_raises_naming(call, exc, words)


def test_opcheck():
    A = torch.randn(2, 60, 40)
    torch.library.opcheck(torch.ops.svdkernels.rsvd.default, (A, 4, 10, 2, 3, None))
    torch.library.opcheck(torch.ops.svdkernels.rsvd.default, (A.bfloat16(), 4, 5, 1, 3, torch.float32))
    torch.library.opcheck(torch.ops.svdkernels.rsvd.default, (A, 4, 40, 2, 3, None))  # exact path


def test_torch_compile_fullgraph():
    A = torch.randn(2, 64, 48)

    def f(A: torch.Tensor) -> torch.Tensor:
        U, S, Vh = svdkernels.rsvd(A, 6, seed=4)
        return (U * S.unsqueeze(-2)) @ Vh

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(A), f(A))


def test_reference_backend_override_gives_same_result():
    A = torch.randn(50, 40)
    with svdkernels.use_backend("reference"):
        a = svdkernels.rsvd(A, 3, seed=1)
    b = svdkernels.rsvd(A, 3, seed=1)
    assert torch.equal(a[1], b[1])


# --------------------------------------------------------------------------- scale, finiteness, seed


@pytest.mark.parametrize("scale", [1e-30, 1e-25, 1e18], ids=lambda c: f"x{c:g}")
def test_scale_invariance(scale):
    # The algorithm is scale-invariant; the Grams are scaled by powers of two so the
    # implementation is too. float32 relative tolerance: rounding of A·c and of S.
    M = spectral_matrix("poly", 200, 150, batch=(2,), seed=5)
    A = M.A.float()
    U1, S1, Vh1 = svdkernels.rsvd(A, 4, seed=0)
    Uc, Sc, Vhc = svdkernels.rsvd(A * scale, 4, seed=0)
    assert torch.isfinite(Sc).all() and (Sc > 0).all()
    torch.testing.assert_close(Sc.double() / scale, S1.double(), rtol=1e-5, atol=0)
    torch.testing.assert_close(Sc.double() / scale, M.S[..., :4], rtol=1e-4, atol=0)
    # Same subspace: the projectors agree.
    torch.testing.assert_close(Uc @ Uc.mT, U1 @ U1.mT, atol=1e-4, rtol=0)


def test_huge_entries_whose_products_overflow_are_rescaled():
    # sigma_1 = 2.5e38 is representable in float32, but A·Ω (Gaussian Ω) is not:
    # the driver must redo the products on a scaled copy, not return inf/NaN.
    g = torch.Generator().manual_seed(0)
    A = torch.randn(60, 40, generator=g)
    A[0] = 40 * torch.sign(torch.randn(40, generator=g))  # ||row 0|| ≈ 253, the rest ≈ 6
    big = 2.0**120  # 1.33e36
    _, S_ref, _ = svdkernels.rsvd(A, 3, oversample=5, seed=0)
    huge = A * big
    assert torch.isfinite(huge).all() and S_ref[0] * big < torch.finfo(torch.float32).max
    g.manual_seed(1)
    assert not torch.isfinite(huge @ torch.randn(40, 8, generator=g)).all()  # the premise
    U, S, Vh = svdkernels.rsvd(huge, 3, oversample=5, seed=0)
    # Power-of-two scalings are exact: the same result as the unscaled matrix.
    torch.testing.assert_close(S.double() / big, S_ref.double(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_non_finite_input_names_A(bad, dtype):
    A = torch.randn(3, 60, 40, dtype=dtype)
    A[1, 5, 7] = bad
    assert_raises_naming(lambda: svdkernels.rsvd(A, 4, seed=0), ValueError, ["A", "finite", "[1]"])
    # The exact path (sketch covers the matrix) too.
    assert_raises_naming(lambda: svdkernels.rsvd(A, 4, oversample=40, seed=0), ValueError, ["A", "finite"])


def test_non_finite_sparse_input_names_A():
    A = torch.randn(60, 40).relu().to_sparse()
    A.values()[0] = float("nan")
    assert_raises_naming(lambda: svdkernels.rsvd(A, 4, seed=0), ValueError, ["A", "finite"])


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda: svdkernels.rsvd(torch.randn(10, 8), 2, seed=2**70), ValueError, ["seed", "int64", str(2**70)]),
        (lambda: svdkernels.rsvd(torch.randn(10, 8), 2, seed=-(2**64)), ValueError, ["seed", "int64"]),
        (lambda: svdkernels.rsvd(torch.randn(10, 8), 2, seed=1.5), TypeError, ["seed", "int", "float"]),
        (lambda: svdkernels.rsvd(torch.randn(10, 8), 2, method="lanczos"), ValueError, ["method", "krylov", "lanczos"]),
        (lambda: svdkernels.rsvd(torch.randn(10, 8), 2, tol=0.0), ValueError, ["tol", "> 0", "0.0"]),
        (lambda: svdkernels.rsvd(torch.randn(10, 8), 2, tol=float("nan")), ValueError, ["tol", "nan"]),
        (lambda: svdkernels.rsvd(torch.randn(10, 8), 2, tol=1e-2, method="krylov"), ValueError, ["tol", "hmt", "dash", "krylov"]),
        (lambda: svdkernels.rsvd(torch.randn(10, 8), 2, center="mean"), ValueError, ["center", "columns", "'mean'"]),
        (lambda: svdkernels.rsvd(torch.randn(10, 8).to_sparse_csc(), 2), TypeError, ["A", "sparse_csr", "torch.sparse_csc"]),
        (lambda: svdkernels.rsvd(torch.randn(2, 2, 10, 8).to_sparse(), 2), ValueError, ["A", "[B, m, n]", "(2, 2, 10, 8)"]),
        (lambda: svdkernels.rsvd(torch.randn(10, 8).to_sparse(), 9), ValueError, ["rank", "min(m, n) = 8", "got 9"]),
    ],
    ids=["seed-2**70", "seed-neg", "seed-float", "method", "tol0", "tol-nan", "tol-krylov", "center", "csc", "sparse-4d", "sparse-rank"],
)
def test_new_arguments_bad_input_names_the_argument(call, exc, words):
    assert_raises_naming(call, exc, words)


# --------------------------------------------------------------------------- accuracy mode, tol


@pytest.mark.parametrize("decay", [0.5, 1.0], ids=lambda d: f"poly{d}")
@pytest.mark.parametrize("n_iter", [1, 2])
def test_krylov_lower_error_than_hmt_at_equal_passes(decay, n_iter):
    # Same 2·n_iter + 2 passes over A; block Krylov keeps every block of the basis
    # (measured here at 512x384, k=16: d=0.5, n_iter=1: HMT 1.0117, Krylov 1.0066;
    # n_iter=2: 1.0021 vs 1.0003).
    M = spectral_matrix("poly", 512, 384, batch=(2,), decay=decay, seed=3)
    A = M.A.float()
    ratio = {}
    for method in ("hmt", "krylov"):
        U, S, Vh = svdkernels.rsvd(A, 16, n_iter=n_iter, method=method, seed=0)
        e = relative_errors(M.A, U, S, Vh, M.S)
        assert e["orth"].max() <= ORTH_TOL
        ratio[method] = e["ratio"]
    assert (ratio["krylov"] < ratio["hmt"]).all(), ratio


def test_krylov_lower_error_on_real_weights(minilm_groups):
    ours, hmt = [], []
    for W in minilm_groups:
        St = torch.linalg.svdvals(W.double())
        for method, out in (("krylov", ours), ("hmt", hmt)):
            U, S, Vh = svdkernels.rsvd(W, 16, n_iter=1, method=method, seed=0)
            out.append(relative_errors(W, U, S, Vh, St)["ratio"])
    assert torch.cat(ours).mean() < torch.cat(hmt).mean(), (torch.cat(ours).mean(), torch.cat(hmt).mean())


def test_dash_lower_error_on_real_weights(minilm_groups):
    # dashSVD's shift acts from the second iteration (n_iter=2: 6 passes). Measured at
    # k=16: mean err/opt over the 37 weights HMT 1.00660, dash 1.00496 (Krylov 1.00171).
    dash, hmt = [], []
    for W in minilm_groups:
        St = torch.linalg.svdvals(W.double())
        for method, out in (("dash", dash), ("hmt", hmt)):
            U, S, Vh = svdkernels.rsvd(W, 16, n_iter=2, method=method, seed=0)
            out.append(relative_errors(W, U, S, Vh, St)["ratio"])
    assert torch.cat(dash).mean() < torch.cat(hmt).mean(), (torch.cat(dash).mean(), torch.cat(hmt).mean())


class CountingPasses(reference.TorchPasses):
    """The reference passes, counting the products with A."""

    def __init__(self) -> None:
        self.count = 0

    def matmul(self, A, X, *, transpose, dtype):
        self.count += 1
        return super().matmul(A, X, transpose=transpose, dtype=dtype)


def test_tol_stops_the_power_iteration_early():
    M = spectral_matrix("poly", 400, 300, batch=(2,), seed=2)
    A = M.A.float()
    loose, tight = CountingPasses(), CountingPasses()
    U, S, Vh = reference.rsvd(A, 16, n_iter=20, seed=0, tol=1e-2, passes=loose)
    e = relative_errors(M.A, U, S, Vh, M.S)
    assert e["ratio"].max() <= 1.01 and e["orth"].max() <= ORTH_TOL, e
    reference.rsvd(A, 16, n_iter=20, seed=0, tol=1e-12, passes=tight)
    # sketch (counted as a matmul) + 2 per iteration + projection
    assert loose.count < tight.count == 2 * 20 + 2, (loose.count, tight.count)


def test_dash_with_tol_stops_early_and_stays_accurate():
    M = spectral_matrix("poly", 400, 300, batch=(2,), seed=2)
    A = M.A.float()
    loose, tight = CountingPasses(), CountingPasses()
    U, S, Vh = reference.rsvd(A, 16, n_iter=20, seed=0, tol=1e-2, method="dash", passes=loose)
    e = relative_errors(M.A, U, S, Vh, M.S)
    assert e["ratio"].max() <= 1.01 and e["orth"].max() <= ORTH_TOL, e
    reference.rsvd(A, 16, n_iter=20, seed=0, tol=1e-12, method="dash", passes=tight)
    assert loose.count < tight.count == 2 * 20 + 2, (loose.count, tight.count)


# --------------------------------------------------------------------------- float64, sparse, center


def test_float64_in_float64_out_and_accurate():
    M = spectral_matrix("exp", 300, 200, batch=(2,), decay=0.2, seed=4)  # sigma_24 = 1e-4.6
    U, S, Vh = svdkernels.rsvd(M.A, 24, n_iter=3, seed=0)
    assert (U.dtype, S.dtype, Vh.dtype) == (torch.float64,) * 3
    e = relative_errors(M.A, U, S, Vh, M.S)
    # float64 reaches what float32 cannot: top singular values to 1e-10 relative.
    assert e["sv"].max() <= 1e-10 and e["orth"].max() <= 1e-12, e
    assert e["ratio"].max() <= 1.01


def _sparse_case(seed: int = 0, batch: tuple[int, ...] = ()) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(120, 90, generator=g) < 0.1  # one pattern: batched CSR needs equal nnz
    return torch.randn(*batch, 120, 90, generator=g) * mask


@pytest.mark.parametrize("layout", ["coo", "csr"])
@pytest.mark.parametrize("batch", [(), (3,)], ids=["2d", "batched"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_sparse_matches_exact_svd(layout, batch, dtype):
    dense = _sparse_case(batch=batch).to(dtype)
    A = dense.to_sparse() if layout == "coo" else dense.to_sparse_csr()
    U, S, Vh = svdkernels.rsvd(A, 6, oversample=20, n_iter=4, seed=0)
    assert U.layout == torch.strided and U.dtype == dtype and U.shape == (*batch, 120, 6)
    e = relative_errors(dense, U, S, Vh, torch.linalg.svdvals(dense.double()))
    # A flat random spectrum: the bound is the 1.01 with a wider sketch.
    assert e["ratio"].max() <= 1.01 and e["orth"].max() <= (1e-10 if dtype == torch.float64 else ORTH_TOL), e


@pytest.mark.parametrize("center", ["columns", "rows"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_center_equals_factoring_the_centred_matrix(center, sparse):
    dense = _sparse_case(seed=1, batch=(2,)).double() + 0.5  # non-zero means
    centred = dense - (dense.mean(-2, keepdim=True) if center == "columns" else dense.mean(-1, keepdim=True))
    A = dense.to_sparse() if sparse else dense
    # Same test matrix, every pass float64 (sparse A always is; dense float64 steers
    # in float32 unless told): the implicit centring gives the factors of the
    # explicitly centred matrix, to float64 rounding.
    f64 = torch.float64
    U, S, Vh = svdkernels.rsvd(A, 5, oversample=30, n_iter=4, center=center, seed=0, sketch_dtype=f64)
    U2, S2, Vh2 = svdkernels.rsvd(centred, 5, oversample=30, n_iter=4, seed=0, sketch_dtype=f64)
    torch.testing.assert_close(S, S2, rtol=1e-10, atol=0)
    torch.testing.assert_close(U @ U.mT, U2 @ U2.mT, rtol=0, atol=1e-9)
    # and they are accurate for it (a flat random spectrum: within 1e-4 of exact)
    torch.testing.assert_close(S, torch.linalg.svdvals(centred)[..., :5], rtol=1e-4, atol=0)


def test_center_true_is_columns():
    A = torch.randn(50, 40, dtype=torch.float64) + 3.0
    a = svdkernels.rsvd(A, 3, center=True, seed=0)
    b = svdkernels.rsvd(A, 3, center="columns", seed=0)
    assert torch.equal(a[1], b[1])


def test_opcheck_new_arguments():
    A = torch.randn(2, 60, 40)
    op = torch.ops.svdkernels.rsvd.default
    torch.library.opcheck(op, (A.double(), 4, 10, 2, 3, None))
    torch.library.opcheck(op, (A, 4, 6, 1, 3, None, "columns", "krylov", None))
    torch.library.opcheck(op, (A, 4, 6, 3, 3, None, None, "hmt", 1e-2))


@pytest.mark.parametrize("mag", [1e15, 1e20, 1e30])
def test_one_dominant_entry_gives_the_right_top_singular_value(mag):
    """``A`` with one entry ``mag`` times the rest: the final basis used to come out of a
    float32 CholeskyQR pass with columns of norm ~1e4, and σ₁ 300–2000 times too large
    (on the reference and the C++ backend alike). Shifted CholeskyQR3 keeps it exact."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(64, 48, generator=g)
    A[3, 5] = mag
    U, S, Vh = svdkernels.rsvd(A, 4, seed=0)
    assert abs(float(S[0]) / mag - 1) < 1e-5, float(S[0])
    assert float(U.norm(dim=0).max()) < 1 + 1e-5 and float(Vh.norm(dim=1).max()) < 1 + 1e-5
