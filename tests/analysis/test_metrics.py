"""Metrics of svdkernels.analysis against their definitions on an exact float64 SVD."""
from __future__ import annotations

import math

import pytest
import torch

from svdkernels.analysis import (
    effective_rank,
    intruder_dimensions,
    l12_norm,
    matrix_nuclear_norm_score,
    nuclear_norm,
    singular_values,
    stable_rank,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _with_spectrum(s: torch.Tensor, m: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """``U diag(s) Vᵀ`` float64 with Haar U [m, p], V [n, p]; returns (A, U, V)."""
    p = s.numel()
    U = torch.linalg.qr(torch.randn(m, p, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, p, generator=gen, dtype=torch.float64))[0]
    return (U * s) @ V.T, U, V


@pytest.mark.parametrize("shape", [(3, 20, 12), (2, 2, 9, 30), (1, 16, 16)], ids=lambda s: "x".join(map(str, s)))
def test_singular_values_match_float64_svd(shape) -> None:
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(*shape, generator=gen)
    want = torch.linalg.svdvals(A.double())
    got = singular_values(A)
    assert got.shape == want.shape and got.dtype == torch.float32
    # float64 Gram: error ~1e-16·σ1²/σi; these matrices are well conditioned.
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(singular_values(A, k=3).double(), want[..., :3], rtol=1e-6, atol=0)


def test_effective_rank_is_roy_vetterli() -> None:
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(4, 30, 20, generator=gen, dtype=torch.float64)
    S = torch.linalg.svdvals(A)
    got = effective_rank(S.float())
    for b in range(4):
        p = S[b] / S[b].sum()
        want = math.exp(-float((p * p.log()).sum()))
        assert abs(float(got[b]) - want) < 1e-5 * want
    # Boundary cases of the definition: rank-1 → 1, p equal values → p, zeros ignored, zero matrix → 0.
    torch.testing.assert_close(effective_rank(torch.tensor([[3.0, 0, 0], [2.0, 2.0, 2.0], [0, 0, 0]])),
                               torch.tensor([1.0, 3.0, 0.0]))


def test_stable_rank_is_frobenius_over_spectral() -> None:
    gen = torch.Generator().manual_seed(2)
    A = torch.randn(3, 25, 17, generator=gen, dtype=torch.float64)
    want = torch.linalg.matrix_norm(A).pow(2) / torch.linalg.matrix_norm(A, ord=2).pow(2)
    got = stable_rank(torch.linalg.svdvals(A).float())
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


def test_nuclear_norm_exact_and_l12_bounds() -> None:
    gen = torch.Generator().manual_seed(3)
    s = torch.logspace(0, -3, 12, dtype=torch.float64)
    A = torch.stack([_with_spectrum(s * (b + 1), 24, 40, gen)[0] for b in range(3)])
    exact = torch.linalg.matrix_norm(A, ord="nuc")
    torch.testing.assert_close(nuclear_norm(A.float()).double(), exact, rtol=1e-6, atol=0)
    sur = nuclear_norm(A.float(), exact=False).double()
    torch.testing.assert_close(sur, A.norm(dim=-2).sum(-1), rtol=1e-6, atol=0)  # Σ_j ‖A[:, j]‖
    # ‖A‖_F ≤ ‖A‖_* ≤ ‖A‖_{1,2} ≤ sqrt(n)·‖A‖_F (tiny slack for float32 rounding).
    fro = torch.linalg.matrix_norm(A)
    assert bool((fro <= exact).all())
    assert bool((exact <= sur * (1 + 1e-6)).all()), (exact, sur)
    assert bool((sur <= math.sqrt(40) * fro * (1 + 1e-6)).all())
    # Equality where the columns are orthogonal: the surrogate is exact there.
    Q = torch.linalg.qr(torch.randn(30, 8, generator=gen, dtype=torch.float64))[0] * torch.arange(1.0, 9.0).double()
    torch.testing.assert_close(l12_norm(Q.float()).double(), torch.linalg.matrix_norm(Q, ord="nuc"), rtol=1e-6, atol=0)


def _mnn_reference(R: torch.Tensor) -> float:
    """The paper's definition on one sequence ``[N, d]`` float64, literally."""
    N, d = R.shape
    R = R - R.mean(0, keepdim=True)
    R = R / R.norm(dim=1, keepdim=True)
    cols = sorted((float(R[:, j].norm()) for j in range(d)), reverse=True)
    return sum(cols[: min(N, d)]) / N


def test_matrix_nuclear_norm_score_definition_and_mask() -> None:
    gen = torch.Generator().manual_seed(4)
    H = torch.randn(3, 7, 5, generator=gen, dtype=torch.float64)  # N = 7 > d = 5: top D = 5 columns
    got = matrix_nuclear_norm_score(H.float())
    want = torch.tensor([_mnn_reference(H[b]) for b in range(3)], dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    # Padding: sequence b has lengths[b] valid tokens; the rest is garbage that must not count.
    lengths = [7, 4, 2]  # N = 4, 2 < d: top D = N columns
    mask = torch.arange(7)[None] < torch.tensor(lengths)[:, None]
    Hp = torch.where(mask[..., None], H, torch.full_like(H, 1e3))
    got = matrix_nuclear_norm_score(Hp.float(), mask)
    want = torch.tensor([_mnn_reference(H[b, : lengths[b]]) for b in range(3)], dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


def _planted(m: int, n: int, n_planted: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Base ``W0`` with decaying spectrum and ``W0 + Σ λ x yᵀ``, each ``x`` spread evenly over
    16 of W0's bottom left singular vectors (|cos| ≤ ~1/4 with every one), ``y`` likewise
    over the matching right ones, ``λ`` above W0's top singular value: each update is a new
    top singular direction orthogonal to W0's top ones."""
    p = min(m, n)
    s = torch.linspace(2.0, 0.01, p, dtype=torch.float64)
    W0, U, V = _with_spectrum(s, m, n, gen)
    Wft = W0.clone()
    for j in range(n_planted):
        idx = torch.arange(p - 16 * (j + 1), p - 16 * j)
        x = U[:, idx].sum(1) / 4
        y = V[:, idx] @ torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64))[0][:, 0]
        Wft += (5.0 + j) * torch.outer(x, y)
    return W0, Wft


@pytest.mark.parametrize("n_planted", [0, 1, 3])
def test_intruder_dimensions_count_planted_updates(n_planted: int) -> None:
    gen = torch.Generator().manual_seed(5)
    pairs = [_planted(96, 80, n_planted, gen) for _ in range(2)]
    W0 = torch.stack([p[0] for p in pairs]).float()
    Wft = torch.stack([p[1] for p in pairs]).float()
    res = intruder_dimensions(W0, Wft, k=10, eps=0.5)
    assert res.count.tolist() == [n_planted, n_planted]
    # The planted directions have the largest singular values: they are the first ones.
    assert res.mask[:, :n_planted].all() and not res.mask[:, n_planted:].any()
    assert bool((res.similarity[:, :n_planted] < 0.35).all())
    assert bool((res.similarity[:, n_planted:] > 0.99).all())
    # Against itself, nothing intrudes.
    assert intruder_dimensions(Wft, Wft).count.tolist() == [0, 0]


def test_intruder_similarity_matches_loop_definition() -> None:
    gen = torch.Generator().manual_seed(6)
    W0 = torch.randn(40, 30, generator=gen, dtype=torch.float64)
    Wft = W0 + 0.8 * torch.randn(40, 30, generator=gen, dtype=torch.float64)
    U0 = torch.linalg.svd(W0, full_matrices=False)[0]
    U = torch.linalg.svd(Wft, full_matrices=False)[0]
    want = [max(abs(float(U0[:, i] @ U[:, j])) for i in range(30)) for j in range(10)]
    res = intruder_dimensions(W0.float(), Wft.float())
    torch.testing.assert_close(res.similarity.double(), torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-5)
    assert int(res.count) == sum(w < 0.5 for w in want)


def test_bad_input_names_the_argument() -> None:
    A = torch.randn(4, 5)
    with pytest.raises(TypeError, match="A: expected dtype"):
        singular_values(A.int())
    with pytest.raises(ValueError, match=r"A: expected a tensor of shape \[\.\.\., m, n\]"):
        nuclear_norm(torch.randn(5))
    with pytest.raises(ValueError, match="k: expected 1 <= k <= min"):
        singular_values(A, k=5)
    with pytest.raises(ValueError, match="S: expected non-negative"):
        effective_rank(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="W_ft: expected the shape of W_base"):
        intruder_dimensions(A, torch.randn(5, 4))
    with pytest.raises(ValueError, match="W_base: expected finite"):
        intruder_dimensions(torch.full((4, 5), math.nan), A)
    with pytest.raises(ValueError, match="eps: expected a number in"):
        intruder_dimensions(A, A, k=2, eps=0)
    with pytest.raises(ValueError, match="mask: expected shape"):
        matrix_nuclear_norm_score(torch.randn(2, 3, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="hidden_states: expected a non-empty"):
        matrix_nuclear_norm_score(torch.randn(2, 0, 4))
