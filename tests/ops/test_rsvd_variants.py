"""rsvd's second-wave variants: dashSVD's shifted power iteration (``method="dash"``),
complex input, and the rank chosen by the captured energy (``rsvd_pve``).

Every accuracy check is against an exact float64 (or complex128) SVD.
"""
import pytest
import torch

import svdkernels
from svdkernels.ops.rsvd import PVEResult, rsvd_pve
from svdkernels.testing.errors import assert_raises_naming
from svdkernels.testing.matrices import relative_errors, spectral_matrix

ORTH_TOL = 1e-4  # float32 factors, as tests/ops/test_rsvd.py


# --------------------------------------------------------------------------- method="dash"


@pytest.mark.parametrize("decay,n_iter", [(0.5, 2), (0.5, 3), (1.0, 2)], ids=["poly0.5-2", "poly0.5-3", "poly1-2"])
def test_dash_lower_error_than_hmt_at_equal_passes(decay, n_iter):
    # Same 2·n_iter + 2 passes over A. Measured here (256x192, k=12, per matrix):
    # d=0.5: n_iter=2 HMT 1.00110/1.00102, dash 1.00079/1.00068; n_iter=3 1.00022/1.00017
    # vs 1.00010/1.00007. d=1, n_iter=2: 1.000105/1.000071 vs 1.000069/1.000043.
    M = spectral_matrix("poly", 256, 192, batch=(2,), decay=decay, seed=3)
    A = M.A.float()
    ratio = {}
    for method in ("hmt", "dash"):
        U, S, Vh = svdkernels.rsvd(A, 12, n_iter=n_iter, method=method, seed=0)
        e = relative_errors(M.A, U, S, Vh, M.S)
        assert e["orth"].max() <= ORTH_TOL, e
        ratio[method] = e["ratio"]
    assert (ratio["dash"] < ratio["hmt"]).all(), ratio


def test_dash_first_step_is_unshifted_subspace_iteration():
    # alpha starts at 0 (dashSVD, Alg. 3): with one iteration dash is HMT with every pass
    # in float32 and one orthonormalisation less, so the results agree to rounding.
    M = spectral_matrix("poly", 200, 150, batch=(2,), seed=5)
    A = M.A.float()
    _, S_dash, _ = svdkernels.rsvd(A, 8, n_iter=1, method="dash", seed=0)
    _, S_hmt, _ = svdkernels.rsvd(A, 8, n_iter=1, seed=0, sketch_dtype=torch.float32)
    torch.testing.assert_close(S_dash, S_hmt, rtol=1e-5, atol=0)


def test_dash_shift_stays_below_the_tail():
    # The shift must not pass sigma_l^2 / 2 (else tail eigenvalues |0 - alpha| would
    # dominate): many iterations on a flat spectrum still converge to the exact values.
    M = spectral_matrix("poly", 300, 200, batch=(2,), decay=0.3, seed=6)
    U, S, Vh = svdkernels.rsvd(M.A, 10, oversample=10, n_iter=12, method="dash", seed=0)
    e = relative_errors(M.A, U, S, Vh, M.S)
    assert e["sv"].max() <= 1e-6 and e["orth"].max() <= 1e-12 and e["ratio"].max() <= 1.001, e


@pytest.mark.parametrize("scale", [1e-30, 1e18])
def test_dash_scale_invariance(scale):
    # A·Aᵀ·Q has size sigma_1^2: 1e-60 and 1e36 leave float32; the power-of-two scaling
    # of each step keeps it in range.
    M = spectral_matrix("poly", 120, 100, batch=(2,), seed=8)
    A = M.A.float()
    _, S1, _ = svdkernels.rsvd(A, 6, n_iter=3, method="dash", seed=0)
    _, S2, _ = svdkernels.rsvd(A * scale, 6, n_iter=3, method="dash", seed=0)
    torch.testing.assert_close(S2.double() / scale, S1.double(), rtol=1e-5, atol=0)


def test_dash_sparse_and_float64():
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(120, 90, generator=g, dtype=torch.float64) * (torch.rand(120, 90, generator=g) < 0.1)
    U, S, Vh = svdkernels.rsvd(dense.to_sparse_csr(), 6, oversample=20, n_iter=4, method="dash", seed=0)
    assert U.dtype == torch.float64
    e = relative_errors(dense, U, S, Vh, torch.linalg.svdvals(dense))
    assert e["ratio"].max() <= 1.01 and e["orth"].max() <= 1e-10, e


# --------------------------------------------------------------------------- complex input


def _complex_case(batch=(2,), m=160, n=120, decay=1.0, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.complex128
    U, _ = torch.linalg.qr(torch.randn(*batch, m, n, dtype=c, generator=g))
    V, _ = torch.linalg.qr(torch.randn(*batch, n, n, dtype=c, generator=g))
    s = (torch.arange(n, dtype=torch.float64) + 1) ** -decay
    return (U * s.to(c)) @ V.mH


def _complex_errors(A, U, S, Vh, k):
    A = A.to(torch.complex128)
    St = torch.linalg.svdvals(A)
    err = torch.linalg.matrix_norm(A - (U.to(A.dtype) * S.to(A.dtype).unsqueeze(-2)) @ Vh.to(A.dtype))
    eye = torch.eye(k, dtype=A.dtype)
    orth = torch.maximum(torch.linalg.matrix_norm(U.mH @ U - eye.to(U.dtype)),
                         torch.linalg.matrix_norm(Vh @ Vh.mH - eye.to(Vh.dtype)))
    sv = ((S.double()[..., : k // 2] - St[..., : k // 2]) / St[..., : k // 2]).abs().amax(-1)
    return err / St[..., k:].pow(2).sum(-1).sqrt(), sv, orth


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
@pytest.mark.parametrize("method", ["hmt", "krylov", "dash"])
def test_complex_matches_exact_svd(dtype, method):
    A = _complex_case()
    U, S, Vh = svdkernels.rsvd(A.to(dtype), 8, seed=0, method=method)
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    assert (U.dtype, S.dtype, Vh.dtype) == (dtype, real, dtype)
    ratio, sv, orth = _complex_errors(A, U, S, Vh, 8)
    tol = 1e-12 if dtype == torch.complex128 else ORTH_TOL
    # Measured: ratio 1.00003 (hmt), 1.0000002 (krylov), 1.00002 (dash).
    assert ratio.max() <= 1.001 and sv.max() <= 1e-3 and orth.max() <= tol, (ratio, sv, orth)


@pytest.mark.parametrize("center", ["columns", "rows"])
def test_complex_center_equals_factoring_the_centred_matrix(center):
    A = _complex_case(batch=(2,), m=80, n=60, decay=0.5, seed=1) + (0.3 + 0.2j)
    centred = A - (A.mean(-2, keepdim=True) if center == "columns" else A.mean(-1, keepdim=True))
    _, S, _ = svdkernels.rsvd(A, 5, oversample=30, n_iter=4, center=center, seed=0)
    _, S2, _ = svdkernels.rsvd(centred, 5, oversample=30, n_iter=4, seed=0)
    torch.testing.assert_close(S, S2, rtol=1e-10, atol=0)
    torch.testing.assert_close(S, torch.linalg.svdvals(centred)[..., :5], rtol=1e-6, atol=0)


def test_complex_svd_lowrank_returns_v_as_torch_does():
    from svdkernels.linalg import svd_lowrank

    # exact rank 6: both factorisations are exact, so the convention is what is tested
    A = _complex_case(batch=(), m=60, n=50, seed=2)
    A = A - (A - torch.linalg.svd(A).U[:, :6] @ (torch.linalg.svd(A).U[:, :6].mH @ A))
    torch.manual_seed(0)
    U, S, V = svd_lowrank(A, q=6, niter=2)
    Ut, St, Vt = torch.svd_lowrank(A, q=6, niter=2)
    assert V.shape == Vt.shape == (50, 6) and V.dtype == Vt.dtype == torch.complex128
    torch.testing.assert_close(S, St, rtol=1e-10, atol=0)
    # A = U·diag(S)·Vᴴ, torch's convention (V, not Vh; conjugated)
    torch.testing.assert_close(U @ torch.diag(S).to(A.dtype) @ V.mH, A, rtol=0, atol=1e-12)
    torch.testing.assert_close(Ut @ torch.diag(St).to(A.dtype) @ Vt.mH, A, rtol=0, atol=1e-12)


def test_complex_opcheck():
    A = _complex_case(batch=(2,), m=40, n=30).to(torch.complex64)
    torch.library.opcheck(torch.ops.svdkernels.rsvd.default, (A, 4, 6, 1, 3, None))
    torch.library.opcheck(torch.ops.svdkernels.rsvd.default, (A.real.double(), 4, 6, 2, 3, None, None, "dash", 1e-2))


# --------------------------------------------------------------------------- rsvd_pve


def _distinct_spectra() -> tuple[torch.Tensor, torch.Tensor]:
    """``[3, 200, 150]`` float64 with three decays (so three ranks), and their exact spectra."""
    mats = [spectral_matrix("poly", 200, 150, decay=d, seed=i) for i, d in enumerate((0.6, 1.0, 2.0))]
    return torch.stack([M.A for M in mats]), torch.stack([M.S for M in mats])


def _exact_rank(S: torch.Tensor, pve: float) -> torch.Tensor:
    frac = S.pow(2).cumsum(-1) / S.pow(2).sum(-1, keepdim=True)
    rank = (frac < pve).sum(-1) + 1
    # precondition: the target is not within rounding of a boundary (else either rank is right)
    at = frac.gather(-1, (rank - 1).unsqueeze(-1))
    before = frac.gather(-1, (rank - 2).clamp_min(0).unsqueeze(-1))
    assert ((at - pve) > 1e-4).all() and (((pve - before) > 1e-4) | (rank.unsqueeze(-1) == 1)).all()
    return rank


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("method", ["hmt", "dash"])
def test_pve_rank_per_matrix_matches_exact_svd(dtype, method):
    A, S_true = _distinct_spectra()
    pve = 0.8
    want = _exact_rank(S_true, pve)
    assert len(set(want.tolist())) == 3  # the batch really has three ranks
    out = rsvd_pve(A.to(dtype), pve, block=8, n_iter=3, method=method, seed=0)
    assert isinstance(out, PVEResult) and out.rank.dtype == torch.int64
    assert torch.equal(out.rank, want), (out.rank, want)
    r_max = int(want.max())
    assert out.U.shape == (3, 200, r_max) and out.S.shape == (3, r_max) and out.Vh.shape == (3, r_max, 150)
    for b, r in enumerate(want.tolist()):
        # padding is exact zeros; the kept part captures >= pve of the energy
        assert not out.U[b, :, r:].any() and not out.S[b, r:].any() and not out.Vh[b, r:].any()
        Ur = out.U[b, :, :r].double()
        captured = (Ur.mT @ A[b]).pow(2).sum() / A[b].pow(2).sum()
        assert captured >= pve - 1e-6, captured
        h = max(r // 2, 1)  # the top half, as relative_errors' "sv"
        torch.testing.assert_close(out.S[b, :h].double(), S_true[b, :h], rtol=1e-3, atol=0)


def test_pve_rank_never_below_exact_on_real_weights():
    # MiniLM's flat spectra: the estimates fall short of the exact values, so the rank
    # may come out above the exact one; never below, and the factors capture >= pve.
    from svdkernels.testing.models import minilm_linear_weights

    W = torch.stack([w for w in minilm_linear_weights().values() if w.shape == (384, 384)][:4])
    S_true = torch.linalg.svdvals(W.double())
    frac = S_true.pow(2).cumsum(-1) / S_true.pow(2).sum(-1, keepdim=True)
    pve = 0.5
    exact = (frac < pve).sum(-1) + 1
    out = rsvd_pve(W, pve, block=32, seed=0)
    assert (out.rank >= exact).all(), (out.rank, exact)
    for b, r in enumerate(out.rank.tolist()):
        U = out.U[b, :, :r].double()
        assert (U.mT @ W[b].double()).pow(2).sum() >= (pve - 1e-5) * W[b].double().pow(2).sum()
    # Measured: the chosen ranks are within 10% of the exact ones at the defaults.
    assert (out.rank <= exact * 1.1).all(), (out.rank, exact)


@pytest.mark.parametrize("layout", ["dense", "coo", "csr"])
def test_pve_with_center_and_sparse(layout):
    g = torch.Generator().manual_seed(3)
    dense = (torch.randn(150, 80, generator=g, dtype=torch.float64) * (torch.rand(150, 80, generator=g) < 0.2)
             * (torch.arange(80, dtype=torch.float64) + 1) ** -1.0 + 0.1)
    A = {"dense": dense, "coo": dense.to_sparse(), "csr": dense.to_sparse_csr()}[layout]
    centred = dense - dense.mean(-2, keepdim=True)
    S_true = torch.linalg.svdvals(centred)
    pve = 0.7
    want = _exact_rank(S_true, pve)
    out = rsvd_pve(A, pve, center=True, block=2, oversample=20, n_iter=4, seed=0)
    assert int(out.rank) == int(want), (out.rank, want)
    torch.testing.assert_close(out.S.double(), S_true[: int(want)], rtol=1e-6, atol=0)


def test_pve_max_rank_caps_and_zero_matrix_gets_rank_zero():
    A, _ = _distinct_spectra()
    out = rsvd_pve(A, 0.999, max_rank=5, block=2, seed=0)
    assert out.rank.tolist() == [5, 5, 5] and out.S.shape == (3, 5)
    Z = torch.cat([torch.zeros(1, 200, 150), A[:1].float()])
    out = rsvd_pve(Z, 0.5, block=2, seed=0)
    assert out.rank[0] == 0 and not out.U[0].any() and out.rank[1] >= 1
    assert torch.isfinite(out.S).all()


def test_pve_batch_dims_and_growth_reaches_beyond_block():
    A, S_true = _distinct_spectra()
    A4 = A.reshape(3, 1, 200, 150).expand(3, 2, 200, 150)
    out = rsvd_pve(A4, 0.93, block=4, n_iter=3, seed=0)
    want = _exact_rank(S_true, 0.93)  # [77, 8, 2]
    assert out.rank.shape == (3, 2) and torch.equal(out.rank, want.unsqueeze(-1).expand(3, 2))
    assert int(want.max()) > 64  # grown 4 -> 8 -> ... -> 128


def test_pve_complex_and_half_precision():
    A = _complex_case(batch=(2,), m=100, n=80, decay=1.0, seed=4)
    S_true = torch.linalg.svdvals(A)
    want = _exact_rank(S_true, 0.85)
    assert torch.equal(rsvd_pve(A, 0.85, block=4, n_iter=3, seed=0).rank, want)
    # float16 entries (max 4.2e3) whose Frobenius norm (7.7e4) is past float16's range:
    # the energy is reduced in float64
    H = torch.stack([spectral_matrix("poly", 200, 150, decay=1.0, seed=0).A]) * 60000
    got = rsvd_pve(H.half(), 0.8, block=4, n_iter=3, seed=0).rank
    assert torch.equal(got, _exact_rank(torch.linalg.svdvals(H.half().double()), 0.8)), got


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda: rsvd_pve(torch.randn(10, 8), 0.0), ValueError, ["pve", "(0, 1]", "0.0"]),
        (lambda: rsvd_pve(torch.randn(10, 8), 1.5), ValueError, ["pve", "(0, 1]", "1.5"]),
        (lambda: rsvd_pve(torch.randn(10, 8), float("nan")), ValueError, ["pve", "nan"]),
        (lambda: rsvd_pve(torch.randn(10, 8), True), TypeError, ["pve", "bool"]),
        (lambda: rsvd_pve(torch.randn(10, 8), 0.9, max_rank=9), ValueError, ["max_rank", "min(m, n) = 8", "9"]),
        (lambda: rsvd_pve(torch.randn(10, 8), 0.9, block=0), ValueError, ["block", ">= 1", "0"]),
        (lambda: rsvd_pve(torch.randn(10, 8), 0.9, method="lanczos"), ValueError, ["method", "dash", "lanczos"]),
        (lambda: rsvd_pve(torch.randn(10), 0.9), ValueError, ["A", "[..., m, n]"]),
        (lambda: svdkernels.rsvd(torch.randn(10, 8, dtype=torch.complex64).to_sparse(), 2), TypeError,
         ["A", "complex", "dense", "sparse_coo"]),
        (lambda: svdkernels.rsvd(torch.randn(10, 8).int(), 2), TypeError, ["A", "complex64", "torch.int32"]),
    ],
    ids=["pve0", "pve1.5", "pve-nan", "pve-bool", "max_rank", "block", "method", "A-1d", "complex-sparse", "int"],
)
def test_bad_input_names_the_argument(call, exc, words):
    assert_raises_naming(call, exc, words)
