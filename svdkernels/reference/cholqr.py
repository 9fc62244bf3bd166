"""Orthonormalisation by Cholesky QR: GEMM-only, batched, no host synchronisation.

CholeskyQR computes ``G = YᵀY``, ``R = chol(G)ᵀ`` and ``Q = Y·R⁻¹``: one Gram GEMM, a
tiny ``l×l`` factorisation and one thin GEMM, instead of a Householder QR that
loops over columns (and, batched on CUDA, over matrices). Its weakness is
conditioning: with the Gram in working precision ``u`` it breaks down once
``κ(Y) ≳ u^(-1/2)`` (≈ 4e3 in float32). Two remedies, used together here:

- the Gram is accumulated in float64 where ``Y`` may be ill-conditioned
  (mixed-precision CholeskyQR, Yamazaki, Tomov & Dongarra 2015);
- where the plain Cholesky fails (``info ≠ 0``) the factor of ``G + s·I`` is taken
  instead, with the shift ``s`` of shifted CholeskyQR (Fukaya et al. 2020), chosen
  per matrix with ``torch.where`` so no branch depends on the data.

Further passes on the (now better-conditioned) result restore orthonormality to
working precision (:func:`cholqr3`).

Scale. ``Q`` does not depend on the scale of ``Y``, but its Gram does: a float32 Gram
of entries around 1e-25 underflows to zero and one of entries around 1e19
overflows. So each matrix is first multiplied by the power of two that brings its
largest entry into [0.5, 1) (:func:`unit_scale`): exact in binary floating point,
so for ordinary inputs ``Q`` is bit for bit what it was without the scaling.
"""
from __future__ import annotations

import torch


def unit_scale(Y: torch.Tensor) -> torch.Tensor:
    """``[B, 1, 1]`` power of two ``2^-e`` with ``max |Y[b]|·2^-e`` in [0.5, 1).

    ``Y`` is ``[B, r, c]``. All-zero (or non-finite) matrices get 1, so they pass
    through unchanged. Power-of-two scaling is exact (no rounding of ``Y``).
    """
    # One fused reduction (no |Y| temporary): this runs on every basis of the range finder.
    amax = torch.linalg.vector_norm(Y, ord=float("inf"), dim=(-2, -1), keepdim=True)
    _, e = torch.frexp(amax)
    ok = torch.isfinite(amax) & (amax > 0)
    return torch.where(ok, torch.ldexp(torch.ones_like(amax), -e), torch.ones_like(amax))


def _shift(G: torch.Tensor, m: int) -> torch.Tensor:
    """``[B]`` Fukaya et al.'s shift ``11·(m·l + l·(l+1))·u·‖Y‖²`` (``‖Y‖² ≤ tr G``)."""
    l = G.shape[-1]
    u = torch.finfo(G.dtype).eps / 2
    tr = G.diagonal(dim1=-2, dim2=-1).sum(-1)
    # The floor keeps a zero Y (all-zero Gram) factorisable; float32's smallest
    # normal keeps R⁻¹ finite once cast to float32, so a zero Y maps to a zero Q.
    return 11.0 * (m * l + l * (l + 1)) * u * tr + torch.finfo(torch.float32).tiny


def cholesky_factor(G: torch.Tensor, m: int) -> torch.Tensor:
    """Upper-triangular ``R`` with ``RᵀR = G`` (or ``G + s·I`` where ``G`` is not PD).

    ``G`` is ``[B, l, l]`` symmetric, the Gram of a ``[B, m, l]`` matrix; returns ``[B, l, l]``
    in ``G``'s dtype.
    """
    L, info = torch.linalg.cholesky_ex(G)
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    L_shifted, _ = torch.linalg.cholesky_ex(G + _shift(G, m)[..., None, None] * eye)
    return torch.where((info == 0)[..., None, None], L, L_shifted).mT


def cholqr(Y: torch.Tensor, *, gram_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """One pass of Cholesky QR: ``Q = Y·R⁻¹`` with ``RᵀR = YᵀY``.

    Args:
        Y: ``[B, m, l]`` float32 or float64, of any magnitude.
        gram_dtype: precision in which ``YᵀY`` is accumulated and factorised;
            float64 for possibly ill-conditioned ``Y``, float32 when ``Y`` is
            already nearly orthonormal.

    Returns:
        ``[B, m, l]`` in ``Y``'s dtype, spanning the same columns. Orthonormal to
        about ``u·κ(Y)`` (float64 Gram) or ``u·κ(Y)²`` (float32 Gram).
    """
    # Power-of-two scaling (exact) keeps the Gram clear of underflow and overflow;
    # Q does not depend on it.
    Y = Y * unit_scale(Y)
    Yg = Y if Y.dtype == gram_dtype else Y.to(gram_dtype)
    G = Yg.mT @ Yg
    # The l x l factorisation is always done in float64: it costs nothing next to
    # the Gram and keeps a float32 Gram's small eigenvalues from breaking it.
    R = cholesky_factor(G.double(), Y.shape[-2])
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    R_inv = torch.linalg.solve_triangular(R, eye, upper=True)
    return Y @ R_inv.to(Y.dtype)


def cholqr3(Y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of ``Y``'s columns to working precision (shifted CholeskyQR3).

    ``[B, m, l]`` float32 in and out. Three passes, Grams in float64, float64, float32.
    Where ``κ(Y)`` exceeds about ``u64^(-1/2)`` (a sketch dominated by one direction,
    e.g. ``A`` with one entry 1e15 times the rest) the first pass needs the shift and
    leaves ``κ(Q₁)`` as large as ~1e4–1e6: a float32 Gram of that is noise, and its
    "successful" Cholesky blew ``Q`` up (columns of norm 1e4, σ₁ a thousand times too
    large). The second float64 pass brings ``κ`` to ~1, the third restores float32
    orthonormality (Fukaya et al. 2020, shifted CholeskyQR3). The extra pass is a thin
    ``m×l×l`` product, next to nothing beside the passes over ``A``.
    """
    return cholqr(cholqr(cholqr(Y, gram_dtype=torch.float64), gram_dtype=torch.float64), gram_dtype=torch.float32)
