"""pivoted_qr / select_columns: the QR identity, Gu–Eisenstat's bound, HIR-Diff's band selection."""
from __future__ import annotations

import pytest
import torch

import svdkernels.linalg as linalg
from svdkernels.testing.errors import assert_raises_naming


def _rrqr_quantities(A: torch.Tensor, idx: torch.Tensor):
    n = A.shape[-1]
    mask = torch.ones(n, dtype=torch.bool)
    mask[idx] = False
    Q, R11 = torch.linalg.qr(A[:, idx])
    R12 = Q.mT @ A[:, mask]
    return torch.linalg.solve_triangular(R11, R12, upper=True), R11


@pytest.mark.parametrize("batch", [(), (3,)], ids=["2d", "batched"])
def test_pivoted_qr_identity_and_pivots(batch):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(*batch, 40, 25, generator=g, dtype=torch.float64) * torch.logspace(0, -3, 25, dtype=torch.float64)
    Q, R, perm = linalg.pivoted_qr(A, 25)
    Ap = A.gather(-1, perm.unsqueeze(-2).expand(A.shape))
    torch.testing.assert_close(Q @ R, Ap)
    torch.testing.assert_close(Q.mT @ Q, torch.eye(25, dtype=A.dtype).expand(*batch, 25, 25))
    d = R.diagonal(dim1=-2, dim2=-1).abs()
    assert (d[..., :-1] >= d[..., 1:] * (1 - 1e-12)).all()  # greedy pivots: non-increasing
    assert torch.equal(perm.sort(-1).values, torch.arange(25).expand(*batch, 25))


def test_strong_rrqr_meets_the_bound_where_greedy_pivoting_does_not():
    # Kahan's matrix fools greedy column pivoting (it picks no pivot at all: the
    # columns' norms come in order) while R11⁻¹R12 grows like 2^k.
    n, c = 30, 0.285
    s = (1 - c * c) ** 0.5
    K = torch.diag(torch.tensor([s**i for i in range(n)], dtype=torch.float64)) @ (
        torch.eye(n, dtype=torch.float64) - c * torch.ones(n, n, dtype=torch.float64).triu(1)
    )
    K = K * (1 + 1e-10 * torch.arange(n, 0, -1, dtype=torch.float64))  # keep greedy's order, as Kahan does
    k, f = n - 1, 1.2
    greedy = linalg.select_columns(K, k, method="pivoted_qr")
    strong = linalg.select_columns(K, k, f=f)
    N_greedy, R11g = _rrqr_quantities(K, greedy)
    N_strong, R11s = _rrqr_quantities(K, strong)
    assert N_strong.abs().max() <= f * (1 + 1e-9), N_strong.abs().max()
    assert N_greedy.abs().max() > 10 * f, N_greedy.abs().max()
    # and R11 keeps the spectrum: its smallest singular value is far larger
    smin = lambda R: torch.linalg.svdvals(R)[-1]  # noqa: E731
    assert smin(R11s) > 100 * smin(R11g), (smin(R11s), smin(R11g))


def test_batched_select_columns_matches_per_matrix():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(3, 12, 40, generator=g, dtype=torch.float64)
    idx = linalg.select_columns(A, 6)
    assert idx.shape == (3, 6) and idx.dtype == torch.int64
    for b in range(3):
        assert torch.equal(idx[b], linalg.select_columns(A[b], 6))
        N, _ = _rrqr_quantities(A[b], idx[b])
        assert N.abs().max() <= 1.2 * (1 + 1e-9)


def test_hir_diff_band_selection_rebuilds_a_rank_3_cube_exactly():
    # A hyperspectral cube H x W x C of 3 materials: Y = abundances · spectra (rank 3).
    g = torch.Generator().manual_seed(2)
    H, W, C = 16, 12, 48
    abundances = torch.rand(H * W, 3, generator=g, dtype=torch.float64)
    wl = torch.linspace(0, 1, C, dtype=torch.float64)
    spectra = torch.stack([torch.exp(-((wl - c) / 0.15) ** 2) for c in (0.2, 0.5, 0.8)]) + 0.05
    Y = abundances @ spectra  # [HW, C]
    E = torch.linalg.svd(Y, full_matrices=False).Vh[:3].mT  # [C, 3]
    bands = linalg.select_columns(E.mT, 3, f=1.2)
    E_hat = E @ torch.linalg.inv(E[bands])
    rebuilt = Y[:, bands] @ E_hat.mT
    torch.testing.assert_close(rebuilt.reshape(H, W, C), Y.reshape(H, W, C), rtol=1e-10, atol=1e-12)
    assert len(set(bands.tolist())) == 3
    # Gu–Eisenstat: every band is a combination of the chosen three with |coeff| <= f.
    assert E_hat.abs().max() <= 1.2 * (1 + 1e-9), E_hat.abs().max()


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda: linalg.select_columns(torch.randn(5, 8), 6), ValueError, ["k", "min(m, n) = 5", "6"]),
        (lambda: linalg.select_columns(torch.randn(5, 8), 2, f=1.0), ValueError, ["f", "> 1", "1.0"]),
        (lambda: linalg.select_columns(torch.randn(5, 8), 2, method="lu"), ValueError, ["method", "strong_rrqr", "'lu'"]),
        (lambda: linalg.pivoted_qr(torch.randn(5, 8), 0), ValueError, ["k", "got 0"]),
        (lambda: linalg.pivoted_qr(torch.full((5, 8), float("inf")), 2), ValueError, ["A", "finite"]),
        (lambda: linalg.pivoted_qr(torch.ones(5, 8, dtype=torch.int32), 2), TypeError, ["A", "float32", "torch.int32"]),
    ],
    ids=["k", "f", "method", "k0", "inf", "int"],
)
def test_bad_input_names_the_argument(call, exc, words):
    assert_raises_naming(call, exc, words)
