"""Batched projector refresh for the low-rank optimisers.

Every function here takes a *batch* of gradients of one shape, ``G [b, m, n]`` float32,
and returns the new bases of all ``b`` matrices at once, as rows ``P [b, r, k]``
(``k = n`` for the right side, ``m`` for the left): one batched factorisation or one
batched scoring product per shape group, never a Python loop over matrices.

Projectors:

- ``svd``: exact, ``torch.linalg.svd`` (GaLore, Zhao et al. 2024): right side
  ``P = Vh[:r]``, left side ``P = U[:, :r]ᵀ`` -- the very vectors galore-torch takes.
- ``rsvd``: :func:`svdkernels.rsvd` (Halko et al. 2011) from scratch, or, with the
  previous bases, a warm-started subspace iteration (:func:`warm_subspace`): the old
  basis plus a few random columns, ``iters`` passes of ``GᵀG``, Rayleigh-Ritz. A slowly
  moving subspace then costs one pass instead of rsvd's sketch and power passes. The
  rows' signs are canonical (:func:`canonical_signs`), so every route to the same
  subspace (one process, FSDP2's sharded factorisation, DDP's owner rank) gives the same
  basis, which matters when moments are kept.
- ``dct``: a shared DCT-II basis per size (Modoranu et al. 2025, "SVD-Free Low-Rank
  Adaptive Gradient Optimization"): score every DCT vector by the ℓ1 norm of the
  gradient's coefficients, keep the ``r`` best; only the indices are state.
- ``random``: a seeded Gaussian basis scaled by ``1/√r`` (APOLLO, Zhu et al. 2024); not
  orthonormal (documented: ``P·Pᵀ ≈ I`` only in expectation).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Optional

import torch

from svdkernels.ops.rsvd import rsvd

PROJECTORS = ("svd", "rsvd", "dct", "random")


def _oriented(G: torch.Tensor, right: bool) -> torch.Tensor:
    """``G [b, m, n]`` as ``X [b, a, k]`` whose right singular vectors are the basis."""
    return G if right else G.mT


def svd_bases(G: torch.Tensor, rank: int, right: bool) -> torch.Tensor:
    """Exact top-``rank`` singular vectors of each ``G [b, m, n]`` as rows ``[b, r, k]``.

    The SVD of ``G`` itself (not of ``Gᵀ``) on both sides, so the signs are those of
    galore-torch, which matters when moments are kept across refreshes.
    """
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    return (Vh[:, :rank] if right else U[:, :, :rank].mT).contiguous()


def rsvd_bases(G: torch.Tensor, rank: int, right: bool, *, seed: int, oversample: int = 10,
               n_iter: int = 2) -> torch.Tensor:
    """Top-``rank`` singular vectors by one batched :func:`svdkernels.rsvd` call, as rows."""
    U, _, Vh = rsvd(G, rank, oversample=oversample, n_iter=n_iter, seed=seed)
    return (Vh if right else U.mT).contiguous()


def _orthonormal_columns(Y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the columns of ``Y [b, k, l]`` (Householder QR, batched)."""
    return torch.linalg.qr(Y, mode="reduced")[0]


def _no_comm(t: torch.Tensor) -> torch.Tensor:
    return t


def warm_subspace(G: torch.Tensor, previous: torch.Tensor, rank: int, right: bool, *, seed: int,
                  oversample: int = 8, iters: int = 1,
                  allreduce: Callable[[torch.Tensor], torch.Tensor] = _no_comm) -> torch.Tensor:
    """Top-``rank`` right (or left) singular subspace of ``G [b, m, n]``, warm-started.

    Subspace iteration (Halko et al. 2011, Alg. 4.4) from ``Q₀ = [previousᵀ, Ω]``: the
    previous bases ``[b, r, k]`` plus ``oversample`` Gaussian columns; ``iters`` passes
    ``Q ← orth(Xᵀ·X·Q)``; then Rayleigh-Ritz (``B = X·Q``, ``W`` = the eigenvectors of
    ``BᵀB``, basis ``Q·W``) so the rows come out sorted by singular value. If the subspace has not moved, one
    pass recovers it to the accuracy of a converged power iteration.

    Row-sharded ``G`` (FSDP2, right side: this rank's rows ``[b, m_r, n]``): pass
    ``allreduce``, a sum over the ranks; it is applied to the two products that sum over
    rows, ``Gᵀ·(G·Q) [b, n, l]`` each pass and the Gram ``BᵀB [b, l, l]``, and everything
    else is computed from replicated data, so every rank gets the same basis.
    """
    X = _oriented(G, right)  # [b, a, k]
    b, _, k = X.shape
    width = min(rank + oversample, k)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    extra = width - previous.shape[1]
    cols = [previous.mT.to(X.dtype)]
    if extra > 0:
        cols.append(torch.randn(b, k, extra, generator=gen).to(device=X.device, dtype=X.dtype))
    Q = _orthonormal_columns(torch.cat(cols, -1)[..., :width])
    for _ in range(iters):
        Q = _orthonormal_columns(allreduce(X.mT @ (X @ Q)))
    # Rayleigh-Ritz on the small Gram BᵀB = Qᵀ·XᵀX·Q [width, width] (float64): its
    # eigenvectors are B's right singular vectors. LAPACK's SVD of the tall B itself is
    # many times slower on the CPU (gesdd on [688, 72] x 8: ~8 s against ~5 ms here).
    B = X @ Q  # [b, a, width]
    gram = allreduce((B.mT @ B).double())
    _, vecs = torch.linalg.eigh(gram)  # ascending
    W = vecs.flip(-1)[..., :rank].to(X.dtype)  # [b, width, r], largest first
    return (W.mT @ Q.mT).contiguous()  # [b, r, k]


@functools.lru_cache(maxsize=16)
def _dct_cpu(k: int) -> torch.Tensor:
    j = torch.arange(k, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(k, dtype=torch.float64).unsqueeze(0)
    Q = torch.cos(math.pi * (2 * i + 1) * j / (2 * k)) * math.sqrt(2.0 / k)
    Q[0] /= math.sqrt(2.0)
    return Q.float()


_DCT_DEVICE: dict[tuple[int, torch.device], torch.Tensor] = {}


def dct_matrix(k: int, device: torch.device) -> torch.Tensor:
    """The orthonormal DCT-II matrix ``[k, k]`` float32, rows the basis vectors
    (``Q[j, i] = √(2/k)·cos(π(2i+1)j/2k)``, row 0 scaled by ``1/√2``), one per size and
    device, shared by every parameter (built in float64, then rounded)."""
    key = (k, torch.device(device))
    if key not in _DCT_DEVICE:
        _DCT_DEVICE[key] = _dct_cpu(k).to(device)
    return _DCT_DEVICE[key]


def dct_indices(G: torch.Tensor, rank: int, right: bool) -> torch.Tensor:
    """Indices ``[b, r]`` int64 of the ``rank`` DCT-II vectors with the largest ℓ1 norm of
    the gradient's coefficients ``X·Qᵀ``, best first: one batched product."""
    X = _oriented(G, right)
    scores = (X @ dct_matrix(X.shape[-1], X.device).T).abs().sum(-2)  # [b, k]
    return scores.topk(rank, dim=-1).indices


def dct_bases(index: torch.Tensor, k: int) -> torch.Tensor:
    """The basis rows ``[..., r, k]`` of DCT indices ``[..., r]``."""
    return dct_matrix(k, index.device)[index.long()]


def random_basis(seed: int, rank: int, k: int, device: torch.device) -> torch.Tensor:
    """APOLLO's seeded Gaussian basis ``[r, k] / √r`` (drawn on the CPU so every device
    and every resumed run sees the same one)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(rank, k, generator=gen) / math.sqrt(rank)).to(device)


def change_of_basis(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``C = P_new·P_oldᵀ [..., r, r]``: old rank-space coordinates to new ones."""
    return new @ old.mT


def dct_change_of_basis(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``C`` for DCT indices ``[..., r]``: exactly the selection matrix (the DCT rows are
    orthonormal, so ``P_new·P_oldᵀ`` is 1 where the indices agree and 0 elsewhere)."""
    return (new.unsqueeze(-1) == old.unsqueeze(-2)).float()


def rotate_moments(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, C: torch.Tensor, right: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments carried into the new basis (batched ``[b, ...]``).

    First moment: linear, ``m·Cᵀ`` (right, ``m [b, a, r]``) or ``C·m`` (left, ``[b, r, n]``),
    exact: its back-projection is unchanged when the new basis spans the old one.
    Second moment: as the variances of independent coordinates, ``v·(C∘C)ᵀ`` (or
    ``(C∘C)·v``), exact for signed permutations (a DCT index change, SVD sign flips) and
    non-negative always.
    """
    C2 = C * C
    if right:
        return exp_avg @ C.mT, exp_avg_sq @ C2.mT
    return C @ exp_avg, C2 @ exp_avg_sq


def first_vector_cosine(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Q-GaLore's subspace-change signal: ``|cos|`` ``[b]`` of the first basis vectors.

    Q-GaLore publishes the signed cosine; the sign of a singular vector is arbitrary
    (a warm-started or randomized factorisation may flip it with no change of subspace),
    so the absolute value is what measures the change.
    """
    return torch.nn.functional.cosine_similarity(new[:, 0], old[:, 0], dim=-1).abs()


def canonical_signs(P: torch.Tensor) -> torch.Tensor:
    """Basis rows ``P [..., r, k]`` with each row's sign fixed: its largest-magnitude entry
    (the first, on a tie) made positive.

    A singular vector's sign is arbitrary, and different factorisations of the same
    matrix (one process's rsvd, the sharded rsvd under FSDP2, a warm start) may return
    opposite ones. Rotated or reset moments do not care; moments *kept* across a refresh
    (GaLore's rule) do. A rule that reads only the row itself gives every route the same
    sign whenever they agree up to sign and rounding.
    """
    pivot = P.gather(-1, P.abs().argmax(-1, keepdim=True))
    return P * torch.where(pivot < 0, -1.0, 1.0).to(P.dtype)


def captured_energy(G: torch.Tensor, P: torch.Tensor, right: bool) -> torch.Tensor:
    """``‖projection of G on P‖_F / ‖G‖_F`` per matrix ``[b]`` (orthonormal rows ``P``)."""
    R = G @ P.mT if right else P @ G
    return R.flatten(1).norm(dim=-1) / G.flatten(1).norm(dim=-1)


def bases_for(projector: str, G: torch.Tensor, rank: int, right: bool, *, seed: int,
              previous: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Float bases ``[b, r, k]`` of the orthonormal projectors (``svd`` or ``rsvd``)."""
    if projector == "svd":
        return svd_bases(G, rank, right)
    if projector == "rsvd":
        if previous is not None:
            return canonical_signs(warm_subspace(G, previous, rank, right, seed=seed))
        return canonical_signs(rsvd_bases(G, rank, right, seed=seed))
    raise ValueError(f"projector: expected 'svd' or 'rsvd' here, got {projector!r}")
