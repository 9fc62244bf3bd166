"""svd_lowrank / pca_lowrank: PyTorch's own test cases (test_linalg.py's
test_svd_lowrank and test_pca_lowrank), pointed at ours.

torch's helpers ``random_lowrank_matrix``/``random_sparse_matrix`` live in
``torch.testing._internal.common_utils``, which needs ``expecttest``; they are used
when importable, else the equivalents below (same construction: a product of two
matrices with linearly spaced spectra; a diagonally dominant random sparse matrix).
The assertions and tolerances are torch's (float64 ``assertEqual`` defaults:
rtol 1e-7, atol 1e-7).
"""
from __future__ import annotations

import math
import random

import pytest
import torch

from svdkernels.linalg import pca_lowrank, svd_lowrank
from svdkernels.testing.errors import assert_raises_naming

try:  # torch's own helpers, when its test dependencies are installed
    from torch.testing._internal.common_utils import random_lowrank_matrix, random_sparse_matrix
except ImportError:

    def _random_matrix(rows: int, cols: int, *batch: int, dtype=torch.float64) -> torch.Tensor:
        A = torch.randn(*batch, rows, cols, dtype=dtype)
        u, _, vh = torch.linalg.svd(A, full_matrices=False)
        k = min(rows, cols)
        s = torch.linspace(1 / (k + 1), 1, k, dtype=dtype)
        return (u * s.unsqueeze(-2)) @ vh

    def random_lowrank_matrix(rank: int, rows: int, cols: int, *batch: int, dtype=torch.float64, device="cpu"):
        return _random_matrix(rows, rank, *batch, dtype=dtype) @ _random_matrix(rank, cols, *batch, dtype=dtype)

    def random_sparse_matrix(rows: int, cols: int, density: float = 0.01, dtype=torch.float64, device="cpu"):
        nnz = max(min(rows, cols), int(rows * cols * density))
        per_row = math.ceil(nnz / rows)
        idx = [(r, c) for r in range(rows) for c in random.choices(range(cols), k=per_row)][:nnz]
        idx_t = torch.tensor(idx)
        vals = torch.randn(nnz, dtype=dtype)
        vals *= torch.tensor([-float(i - j) ** 2 for i, j in idx], dtype=dtype).exp()  # diagonally dominant
        return torch.sparse_coo_tensor(idx_t.t(), vals, (rows, cols), check_invariants=False).coalesce()


ALL_BATCHES = [(), (1,), (3,), (2, 3)]
# torch's 1000x1000 cases (q up to 1000, and a full dense SVD for the check alone)
# take tens of seconds on 2 shared cores: marked slow.
BIG = pytest.mark.slow
DTYPE = torch.float64


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    random.seed(0)


def _svd_subtest(actual_rank, rows, cols, batches, density=1.0):
    if density == 1:
        a_input = random_lowrank_matrix(actual_rank, rows, cols, *batches, dtype=DTYPE)
        a = a_input
    else:
        a_input = random_sparse_matrix(rows, cols, density, dtype=DTYPE)
        a = a_input.to_dense()
    q = min(rows, cols)
    u, s, v = svd_lowrank(a_input, q=q)
    assert (u.dtype, s.dtype, v.dtype) == (DTYPE,) * 3
    u, s, v = u[..., :q], s[..., :q], v[..., :q]
    torch.testing.assert_close((u * s.unsqueeze(-2)) @ v.mH, a, rtol=1e-7, atol=2e-7)
    U, S, Vh = torch.linalg.svd(a, full_matrices=False)
    torch.testing.assert_close(s, S)
    if density == 1:  # same subspaces as the exact SVD's
        u, v = u[..., :actual_rank], v[..., :actual_rank]
        U, V = U[..., :actual_rank], Vh.mH[..., :actual_rank]
        ones = (u.mH @ U).det().abs()
        torch.testing.assert_close(ones, torch.ones_like(ones))
        torch.testing.assert_close((v.mH @ V).det().abs(), torch.ones_like(ones))


SVD_DENSE = [
    (rank, size, batches)
    for rank, size, batch_list in [
        (2, (17, 4), ALL_BATCHES),
        (4, (17, 4), ALL_BATCHES),
        (4, (17, 17), ALL_BATCHES),
        (10, (100, 40), ALL_BATCHES),
        (7, (1000, 1000), [()]),
    ]
    for batches in batch_list
    for size in ({size, size[::-1]})
]


def _marked(cases, size_at):
    return [pytest.param(*c, marks=BIG) if 1000 in c[size_at] else c for c in cases]


@pytest.mark.parametrize("rank,size,batches", _marked(SVD_DENSE, 1), ids=lambda v: str(v).replace(" ", ""))
def test_svd_lowrank_dense(rank, size, batches):
    _svd_subtest(rank, *size, batches)


@pytest.mark.parametrize(
    "size", [(17, 4), (4, 17), (17, 17), (100, 40), (40, 100), pytest.param((1000, 1000), marks=BIG)], ids=str
)
@pytest.mark.parametrize("density", [0.005, 0.1])
def test_svd_lowrank_sparse(size, density):
    _svd_subtest(None, *size, (), density=density)


def _pca_subtest(guess_rank, actual_rank, rows, cols, batches, pca, density=1.0, use_svd_lowrank=False):
    if density == 1:
        a_input = random_lowrank_matrix(actual_rank, rows, cols, *batches, dtype=DTYPE)
        a = a_input
    else:
        a_input = random_sparse_matrix(rows, cols, density, dtype=DTYPE)
        a = a_input.to_dense()
    if use_svd_lowrank:
        m = a_input.mean(dim=-2, keepdim=True)
        u, s, v = pca(a_input, q=guess_rank, M=m)
    else:
        u, s, v = pca(a_input, q=guess_rank)
    assert s.shape[-1] == guess_rank and u.shape[-2:] == (rows, guess_rank) and v.shape[-2:] == (cols, guess_rank)
    A1 = u @ s.diag_embed() @ v.mT
    c = (a.sum(dim=-2) / rows).reshape(batches + (1, cols))
    A2 = a - torch.ones(batches + (rows, 1), dtype=DTYPE) @ c
    torch.testing.assert_close(A1, A2)
    if density == 1:
        detect_rank = (s.abs() > 1e-5).sum(dim=-1)
        assert torch.equal(detect_rank, actual_rank * torch.ones(batches, dtype=torch.int64))
        S = torch.linalg.svdvals(A2)
        torch.testing.assert_close(s[..., :actual_rank], S[..., :actual_rank])


PCA_DENSE = [
    (guess, rank, s, batches, via)
    for rank, size, batch_list in [
        (2, (17, 4), ALL_BATCHES),
        (2, (100, 4), ALL_BATCHES),
        (6, (100, 40), ALL_BATCHES),
        (12, (1000, 1000), [()]),
    ]
    for batches in batch_list
    for guess in (rank, rank + 2, rank + 6)
    if guess <= min(size)
    for s in (size, size[::-1])
    for via in ("pca_lowrank", "svd_lowrank")
]


@pytest.mark.parametrize("guess,rank,size,batches,via", _marked(PCA_DENSE, 2), ids=lambda v: str(v).replace(" ", ""))
def test_pca_lowrank_dense(guess, rank, size, batches, via):
    if via == "pca_lowrank":
        _pca_subtest(guess, rank, *size, batches, pca_lowrank)
    else:
        _pca_subtest(guess, rank, *size, batches, svd_lowrank, use_svd_lowrank=True)


@pytest.mark.parametrize(
    "guess,size",
    [(4, (17, 4)), (4, (4, 17)), (16, (17, 17)), (21, (100, 40)), (20, (40, 100)), pytest.param(600, (1000, 1000), marks=BIG)],
    ids=str,
)
@pytest.mark.parametrize("density", [0.005, 0.1])
def test_pca_lowrank_sparse(guess, size, density):
    _pca_subtest(guess, None, *size, (), pca_lowrank, density=density)


# --------------------------------------------------------------------------- beyond torch's cases


def test_float32_and_batched_sparse_match_dense():
    # Batched COO and CSR (torch.svd_lowrank takes neither batched), float32.
    # One sparsity pattern for the batch: batched CSR needs equal nnz per matrix.
    dense = torch.randn(3, 80, 50) * (torch.rand(80, 50) < 0.2)
    coo, csr = dense.to_sparse(), dense.to_sparse_csr()
    S_true = torch.linalg.svdvals(dense.double())[..., :4]
    for A in (coo, csr):
        torch.manual_seed(0)
        U, S, V = svd_lowrank(A, q=20, niter=4)
        assert S.dtype == torch.float32 and U.shape == (3, 80, 20) and V.shape == (3, 50, 20)
        torch.testing.assert_close(S[..., :4].double(), S_true, rtol=1e-4, atol=0)


def test_pca_of_sparse_equals_pca_of_dense():
    torch.manual_seed(1)
    dense = (torch.rand(200, 60, dtype=DTYPE) < 0.05) * torch.randn(200, 60, dtype=DTYPE)
    U, S, V = pca_lowrank(dense.to_sparse_csr(), q=60)
    S_true = torch.linalg.svdvals(dense - dense.mean(-2, keepdim=True))
    torch.testing.assert_close(S, S_true)


def test_sparse_is_never_densified(monkeypatch):
    # A poisoned to_dense proves the sparse path never calls it.
    A = random_sparse_matrix(300, 200, 0.02, dtype=DTYPE)

    def boom(*args, **kwargs):
        raise AssertionError("densified")

    monkeypatch.setattr(torch.Tensor, "to_dense", boom)
    U, S, V = pca_lowrank(A, q=5)
    assert S.shape == (5,)
    U, S, V = svd_lowrank(A.to_sparse_csr(), q=5, M=torch.zeros(1, 200, dtype=DTYPE))
    assert S.shape == (5,)


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda: svd_lowrank(torch.randn(10, 8), q=9), ValueError, ["q", "min(m, n) = 8", "9"]),
        (lambda: pca_lowrank(torch.randn(10, 8), q=-1), ValueError, ["q", "-1"]),
        (lambda: svd_lowrank(torch.randn(10, 8), niter=-1), ValueError, ["niter", "-1"]),
        (lambda: svd_lowrank(torch.randn(10, 8), M=torch.randn(3, 8)), ValueError, ["M", "(10, 8)", "(3, 8)"]),
        (lambda: svd_lowrank(torch.randn(10, 8).to_sparse_csc()), TypeError, ["A", "torch.sparse_csc"]),
        (lambda: pca_lowrank(torch.randn(10, 8), center="yes"), TypeError, ["center", "bool", "str"]),
    ],
    ids=["q", "q-neg", "niter", "M-shape", "csc", "center"],
)
def test_bad_input_names_the_argument(call, exc, words):
    assert_raises_naming(call, exc, words)
