"""Weighted truncated SVDs, batched over same-shaped weights.

Every method of :func:`svdkernels.compress.compress_model` truncates the SVD of a
*weighted* weight and maps it back:

- input-side weighting ``W·L`` (``P = L·Lᵀ``: plain SVD ``P = I``; ASVD
  ``P = diag(s^2α)``; SVD-LLM ``P = XᵀX``, ``L = chol(P)``). With ``W·L = U·Σ·Vᵀ``
  the rank-``r`` truncation mapped back is ``U_r·Σ_r·V_rᵀ·L⁻¹ = U_r·U_rᵀ·W``, a
  projection of the outputs onto the top eigenvectors of ``W·P·Wᵀ``. So no inverse
  of ``L`` is ever formed, and the spectrum comes from the eigendecomposition of the
  smaller of ``W·P·Wᵀ [m, m]`` and ``Lᵀ·Wᵀ·W·L [n, n]`` (float64): exact, and
  cheaper than a full SVD. Factors: ``up = U_r·Σ_r^½``, ``down = Σ_r^-½·U_rᵀ·W``
  (SVD-LLM's ``U√Σ`` and ``√Σ·Vᵀ·S⁻¹``, the same products).
- output-side weighting ``diag(√q)·W`` (FWSVD): the same on ``Wᵀ``, giving
  ``W·V_r·V_rᵀ``.
- Basis Sharing: one ``down`` (in the whitened space of the group's summed Gram)
  for a group of layers stacked along the outputs, ``L = chol(ΣXᵢᵀXᵢ)``.

Each metric is scaled to unit mean diagonal first: the truncation does not change,
and both factors stay on the scale of ``W``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["EIGH_DTYPE", "Spectrum", "check_gram", "factors", "output_spectrum", "left_spectrum", "shared_spectrum", "shared_factors", "whitening",
           "refit_up"]


@dataclass
class Spectrum:
    """Eigen-decomposition of a batch of weighted weights.

    ``lam`` ``[B, k]`` float64, the squared weighted singular values, descending;
    ``basis`` ``[B, m, k]`` the left singular vectors (the output directions kept)."""

    lam: torch.Tensor
    basis: torch.Tensor


EIGH_DTYPE: dict[torch.dtype, torch.dtype] = {torch.float64: torch.float64}
"""Precision of the spectral products and eigendecompositions per weight dtype
(default float32). The statistics are accumulated in float64; decomposing in the
weights' own precision (as the SVD-LLM code's float32 SVD does) halves the dominant
cost, and what it perturbs, the smallest eigenvalues, is what truncation drops."""


def _eigh_desc(C: torch.Tensor, weight_dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    lam, vec = torch.linalg.eigh(C.to(EIGH_DTYPE.get(weight_dtype, torch.float32)))
    lam, vec = lam.to(C.dtype), vec.to(C.dtype)
    # Round-off can make the eigenvalues of a PSD matrix slightly negative.
    return lam.flip(-1).clamp_min(0), vec.flip(-1)


def _safe(lam: torch.Tensor) -> torch.Tensor:
    # Divisions by σ of directions the data never excites: any finite value is
    # right there (their product with the inputs is ~0), so clamp far below σ_max.
    floor = lam[..., :1].clamp_min(1e-300) * 1e-24
    return torch.maximum(lam, floor)


def left_spectrum(W: torch.Tensor, *, p: Optional[torch.Tensor] = None, P: Optional[torch.Tensor] = None,
                  L: Optional[torch.Tensor] = None, weight_dtype: torch.dtype = torch.float64) -> Spectrum:
    """Spectrum of ``W·L`` for ``W [B, m, n]`` float64 and the input metric given as
    ``p [B, n]`` (diagonal ``P``), or ``P [B, n, n]`` with its Cholesky factor ``L``,
    or neither (``P = I``). Uses the ``[m, m]`` side when ``m ≤ n``, else ``[n, n]``.
    ``weight_dtype``: the original weights' dtype; the products and the
    eigendecomposition run in :data:`EIGH_DTYPE` of it, the basis is returned in
    ``W``'s dtype."""
    m, n = W.shape[-2:]
    out_dtype = W.dtype
    cd = EIGH_DTYPE.get(weight_dtype, torch.float32)
    W, p, P, L = (None if t is None else t.to(cd) for t in (W, p, P, L))
    if m <= n:
        if p is not None:
            C = (W * p.unsqueeze(-2)) @ W.mT
        elif P is not None:
            C = W @ P @ W.mT
        else:
            C = W @ W.mT
        lam, U = _eigh_desc(C, weight_dtype)
        return Spectrum(lam.to(out_dtype), U.to(out_dtype))
    if p is not None:
        WL = W * p.sqrt().unsqueeze(-2)
    elif L is not None:
        WL = W @ L
    else:
        WL = W
    lam, V = _eigh_desc(WL.mT @ WL, weight_dtype)
    lam, V = lam.to(cd), V.to(cd)
    U = (WL @ V) / _safe(lam).sqrt().unsqueeze(-2)
    return Spectrum(lam.to(out_dtype), U.to(out_dtype))


def output_spectrum(C: torch.Tensor, weight_dtype: torch.dtype = torch.float64) -> Spectrum:
    """Spectrum from ``C = W·P·Wᵀ [B, m, m]`` given directly (for SVD-LLM the Gram
    of the layer's outputs, ``Σ yᵀy = W·XᵀX·Wᵀ``)."""
    lam, U = _eigh_desc(C, weight_dtype)
    return Spectrum(lam, U)


def factors(W: torch.Tensor, spec: Spectrum, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``up [B, m, rank] = U_r·Σ_r^½`` and ``down [B, rank, n] = Σ_r^-½·U_rᵀ·W``:
    ``up·down = U_r·U_rᵀ·W``, the weighted rank-``rank`` truncation."""
    U = spec.basis[..., :rank]
    q = _safe(spec.lam[..., :rank]).pow(0.25)  # σ^½
    return U * q.unsqueeze(-2), (U.mT @ W) / q.unsqueeze(-1)


def check_gram(G: torch.Tensor, names: list[str]) -> None:
    """``ValueError`` naming the layer (``names[i]``) whose Gram ``G[i]`` is not finite."""
    bad = ~torch.isfinite(G.sum(dim=(-2, -1)))
    for i in torch.nonzero(bad).flatten().tolist():
        raise ValueError(f"calib_batches: the input Gram of layer {names[i]!r} is not finite "
                         "(NaN or inf in its inputs)")


def whitening(G: torch.Tensor, names: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD-LLM's whitening of Grams ``G [B, n, n]`` float64 (scaled to unit mean
    diagonal): ``(G̃, L, shifted [B] bool)`` with ``L = chol(G̃)``; ``G̃ = G`` where ``G`` is
    positive definite, else ``G + (−λ_min + 1e-6)·I`` (the shift of the SVD-LLM code,
    relative to the unit mean diagonal).

    Raises ``ValueError`` naming the layer (``names[i]``) when ``G̃`` is still not
    positive definite (e.g. non-finite inputs)."""
    check_gram(G, names)
    L, info = torch.linalg.cholesky_ex(G)
    shifted = info != 0
    if bool(shifted.any()):
        G = G.clone()
        idx = torch.nonzero(info != 0).flatten()
        lam_min = torch.linalg.eigvalsh(G[idx])[..., 0]
        eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
        G[idx] += (-lam_min + 1e-6)[:, None, None] * eye
        L2, info2 = torch.linalg.cholesky_ex(G[idx])
        for j, bad in zip(idx.tolist(), (info2 != 0).tolist()):
            if bad:
                raise ValueError(f"calib_batches: the input Gram of layer {names[j]!r} stays indefinite after "
                                 "the shift -lambda_min + 1e-6 (ill-conditioned inputs)")
        L = L.clone()
        L[idx] = L2
    return G, L, shifted


def refit_up(W: torch.Tensor, G: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SVD-LLM's closed-form update of the left factor: with ``down [B, r, n]``
    fixed, ``up = W·G·downᵀ·(down·G·downᵀ)⁻¹ [B, m, r]`` minimises
    ``‖(W − up·down)·Xᵀ‖_F`` for ``G = XᵀX [B, n, n]``. Where ``down·G·downᵀ`` is
    singular, ``up`` is returned unchanged."""
    GD = G @ down.mT
    M = down @ GD
    chol, info = torch.linalg.cholesky_ex(M)
    new = torch.cholesky_solve((W @ GD).mT, chol).mT
    ok = (info == 0).view(-1, 1, 1)
    return torch.where(ok, new, up)


def shared_spectrum(Ws: torch.Tensor, L: torch.Tensor, weight_dtype: torch.dtype = torch.float64
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Basis Sharing: for ``Ws [B, G, m, n]`` (``G`` layers per group) and the
    Cholesky factor ``L [B, n, n]`` of the group's summed Gram, the eigenpairs
    ``(lam [B, n], V [B, n, n])`` of ``Lᵀ·(Σᵢ Wᵢᵀ·Wᵢ)·L``: the right singular vectors
    of ``[W₁; …; W_G]·L``, descending."""
    WtW = (Ws.mT @ Ws).sum(1)
    return _eigh_desc(L.mT @ WtW @ L, weight_dtype)


def shared_factors(Ws: torch.Tensor, L: torch.Tensor, lam: torch.Tensor, V: torch.Tensor, rank: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``ups [B, G, m, rank] = Wᵢ·L·V_r·Σ_r^-½`` and the shared
    ``down [B, rank, n] = Σ_r^½·V_rᵀ·L⁻¹``."""
    Vr = V[..., :rank]
    q = _safe(lam[..., :rank]).pow(0.25)
    down = torch.linalg.solve_triangular(L.mT, Vr * q.unsqueeze(-2), upper=True).mT
    ups = (Ws @ (L @ Vr).unsqueeze(1)) / q[:, None, None, :]
    return ups, down
