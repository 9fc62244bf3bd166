"""Test matrices with a prescribed spectrum, for SVD-type ops.

``A = U·diag(σ)·Vᵀ`` with Haar-random ``U``, ``V`` (QR of a Gaussian, signs fixed so
the distribution is Haar) and a chosen spectrum, so the optimal rank-k error
``sqrt(Σ_{i>k} σ_i²)`` (Eckart–Young) is known without an SVD. The spectra follow
Halko, Martinsson & Tropp (2011) and Tropp et al. (2017):

- ``"exp"``: exponential decay ``σ_i = 10^(−d·i)``;
- ``"poly"``: polynomial decay ``σ_i = (i+1)^(−d)``;
- ``"lowrank_noise"``: ``diag(1_R, 0) + (ξ/n)·G·Gᵀ`` (square, symmetric), whose
  spectrum is computed exactly in float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SPECTRA = ("exp", "poly", "lowrank_noise")


@dataclass
class SpectralMatrix:
    """A test matrix and its exact spectrum.

    Attributes:
        A: ``[*batch, m, n]`` float64.
        S: ``[*batch, min(m, n)]`` float64, descending: the exact singular values.
    """

    A: torch.Tensor
    S: torch.Tensor

    def optimal_error(self, rank: int) -> torch.Tensor:
        """``[*batch]``: the smallest Frobenius error of any rank-``rank`` approximation."""
        return self.S[..., rank:].pow(2).sum(-1).sqrt()


def haar_orthogonal(
    batch: tuple[int, ...], n: int, cols: int, generator: torch.Generator
) -> torch.Tensor:
    """``[*batch, n, cols]`` float64 with orthonormal columns, Haar distributed."""
    G = torch.randn(*batch, n, cols, dtype=torch.float64, generator=generator)
    Q, R = torch.linalg.qr(G)
    # Multiplying by sign(diag R) makes the distribution exactly Haar (Mezzadri 2007).
    return Q * torch.sgn(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-2)


def spectrum(kind: str, p: int, decay: float) -> torch.Tensor:
    """``[p]`` float64 singular values of the ``exp`` or ``poly`` family."""
    i = torch.arange(p, dtype=torch.float64)
    if kind == "exp":
        return torch.pow(10.0, -decay * i)
    if kind == "poly":
        return torch.pow(i + 1.0, -decay)
    raise ValueError(f"kind: expected 'exp' or 'poly', got {kind!r}")


def spectral_matrix(
    kind: str,
    m: int,
    n: int,
    *,
    batch: tuple[int, ...] = (),
    decay: float | None = None,
    lowrank: int = 10,
    noise: float = 1e-2,
    seed: int = 0,
) -> SpectralMatrix:
    """Build a test matrix of spectrum family ``kind`` (see the module docstring).

    ``decay`` defaults to 0.1 for ``exp`` (σ_32 ≈ 6e-4, resolvable in float32) and 1.0
    for ``poly``. ``lowrank`` (R) and ``noise`` (ξ) are used by ``lowrank_noise``,
    which needs ``m == n``.
    """
    if kind not in SPECTRA:
        raise ValueError(f"kind: expected one of {SPECTRA}, got {kind!r}")
    g = torch.Generator().manual_seed(seed)
    p = min(m, n)
    if kind == "lowrank_noise":
        if m != n:
            raise ValueError(f"lowrank_noise needs a square matrix, got m={m}, n={n}")
        G = torch.randn(*batch, n, n, dtype=torch.float64, generator=g)
        D = torch.zeros(n, dtype=torch.float64)
        D[:lowrank] = 1.0
        A = torch.diag(D) + (noise / n) * (G @ G.mT)
        return SpectralMatrix(A, torch.linalg.svdvals(A))
    s = spectrum(kind, p, 0.1 if kind == "exp" and decay is None else (decay or 1.0))
    U = haar_orthogonal(batch, m, p, g)
    V = haar_orthogonal(batch, n, p, g)
    return SpectralMatrix((U * s) @ V.mT, s.expand(*batch, p).clone())


def relative_errors(
    A: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, S_true: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Accuracy metrics of a rank-k factorisation ``A ≈ U·diag(S)·Vh`` (all ``[*batch]``).

    - ``ratio``: ``‖A − U·diag(S)·Vh‖_F`` over the optimal rank-k error;
    - ``sv``: largest relative error of the top ``k/2`` singular values;
    - ``orth``: ``max(‖UᵀU − I‖_F, ‖Vh·Vhᵀ − I‖_F)``.
    """
    k = S.shape[-1]
    A64 = A.double()
    U64, S64, Vh64 = U.double(), S.double(), Vh.double()
    err = torch.linalg.matrix_norm(A64 - (U64 * S64.unsqueeze(-2)) @ Vh64)
    opt = S_true[..., k:].pow(2).sum(-1).sqrt()
    h = max(k // 2, 1)
    sv = ((S64[..., :h] - S_true[..., :h]) / S_true[..., :h]).abs().amax(-1)
    eye = torch.eye(k, dtype=torch.float64, device=A.device)
    orth = torch.maximum(
        torch.linalg.matrix_norm(U64.mT @ U64 - eye), torch.linalg.matrix_norm(Vh64 @ Vh64.mT - eye)
    )
    return {"ratio": err / opt, "sv": sv, "orth": orth}
