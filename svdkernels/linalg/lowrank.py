"""Drop-in replacements for ``torch.svd_lowrank`` and ``torch.pca_lowrank`` on :func:`svdkernels.rsvd`.

Same signatures, same return conventions (``U, S, V`` with ``V``, not ``Vh``), same
random source (torch's default generator), so switching is an import:

    from svdkernels.linalg import svd_lowrank, pca_lowrank   # was: from torch import ...

What changes underneath (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1 in both):
the sketch is independent per batch element; float32 orthonormalisation is
Cholesky QR (GEMM-only) and the sketch/power passes may run in bfloat16 (see
:func:`svdkernels.rsvd`); float64 keeps Householder QR and a direct SVD of the
small matrix (torch's accuracy); a sparse ``A`` is multiplied as CSR, its transpose
too, and ``M``/centring is applied as a rank-one correction of every product, so
nothing is densified.
"""
from __future__ import annotations

from typing import Optional

import torch

from svdkernels.ops.rsvd import rsvd

Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _check_q(q: object, m: int, n: int) -> int:
    if isinstance(q, bool) or not isinstance(q, int):
        raise TypeError(f"q: expected an int or None, got {type(q).__name__}")
    if not 0 <= q <= min(m, n):
        raise ValueError(f"q: expected 0 <= q <= min(m, n) = {min(m, n)}, got {q}")
    return q


def _check_niter(niter: object) -> int:
    if isinstance(niter, bool) or not isinstance(niter, int):
        raise TypeError(f"niter: expected an int or None, got {type(niter).__name__}")
    if niter < 0:
        raise ValueError(f"niter: expected >= 0, got {niter}")
    return niter


def _dtype(A: torch.Tensor) -> torch.dtype:
    """The dtype of the factors ``U``, ``V``: complex stays complex, float64 stays float64."""
    return A.dtype if A.is_complex() or A.dtype == torch.float64 else torch.float32


def _empty(A: torch.Tensor) -> Factors:
    *batch, m, n = A.shape
    dtype = _dtype(A)
    new = lambda *s, dt=dtype: torch.zeros(*s, dtype=dt, device=A.device)  # noqa: E731
    return new(*batch, m, 0), new(*batch, 0, dt=dtype.to_real()), new(*batch, n, 0)


def _factors(out: Factors) -> Factors:
    U, S, Vh = out
    return U, S, Vh.mH


def svd_lowrank(
    A: torch.Tensor,
    q: Optional[int] = 6,
    niter: Optional[int] = 2,
    M: Optional[torch.Tensor] = None,
) -> Factors:
    """Rank-``q`` SVD of ``A − M``, as ``torch.svd_lowrank``: ``A − M ≈ U·diag(S)·Vᵀ``.

    ``q`` sketch columns and no oversampling, ``niter`` subspace iterations (torch's
    conventions: for a good rank-``k`` approximation take ``q = k + 5..10``).

    Args:
        A: ``[..., m, n]`` dense (float32, float64, float16, bfloat16) or sparse (COO
            ``[m, n]``/``[B, m, n]``, CSR ``[m, n]``/``[B, m, n]``).
        q: rank, ``0 <= q <= min(m, n)`` (default 6; ``None`` means 6).
        niter: subspace iterations (default 2; ``None`` means 2).
        M: ``None`` or a dense tensor broadcastable to ``A``'s shape. ``[..., 1, n]``
            (a row to subtract from every row, e.g. the column means) and ``[..., m, 1]``
            are applied implicitly: a sparse ``A`` stays sparse. A full ``[..., m, n]``
            ``M`` is subtracted densely (it is already dense and as large).

    Returns:
        ``U [..., m, q]``, ``S [..., q]`` descending, ``V [..., n, q]``; float64 for
        float64 ``A``, else float32.
    """
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"A: expected a torch.Tensor, got {type(A).__name__}")
    if A.dim() < 2:
        raise ValueError(f"A: expected a tensor of shape [..., m, n] (at least 2 dims), got shape {tuple(A.shape)}")
    m, n = A.shape[-2:]
    q = _check_q(6 if q is None else q, m, n)
    niter = _check_niter(2 if niter is None else niter)
    if q == 0:
        return _empty(A)
    if M is None:
        return _factors(rsvd(A, q, oversample=0, n_iter=niter))
    if not isinstance(M, torch.Tensor):
        raise TypeError(f"M: expected a torch.Tensor or None, got {type(M).__name__}")
    if M.layout != torch.strided:
        M = M.to_dense()
    try:
        torch.broadcast_shapes(M.shape, A.shape)
        ok = torch.broadcast_shapes(M.shape, A.shape) == A.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"M: expected a shape broadcastable to A's {tuple(A.shape)}, got {tuple(M.shape)}")
    dtype = _dtype(A)
    M = M.to(device=A.device, dtype=dtype)
    if M.dim() >= 2 and (M.shape[-2] == 1 or M.shape[-1] == 1):
        if M.shape[-2] == 1:  # the same row subtracted from every row: A − 1·mᵀ
            v = M[..., 0, :].expand(*A.shape[:-2], n)
            u = torch.ones(*A.shape[:-2], m, dtype=dtype, device=A.device)
        else:  # A − m·1ᵀ
            u = M[..., :, 0].expand(*A.shape[:-2], m)
            v = torch.ones(*A.shape[:-2], n, dtype=dtype, device=A.device)
        # The op draws the seed from torch's default generator, as rsvd(seed=None) does.
        out = torch.ops.svdkernels.rsvd(A, q, 0, niter, None, None, None, "hmt", None, u.contiguous(), v.contiguous())
        return _factors(out)
    dense = A.to_dense() if A.layout != torch.strided else A
    return _factors(rsvd(dense.to(dtype) - M, q, oversample=0, n_iter=niter))


def pca_lowrank(
    A: torch.Tensor,
    q: Optional[int] = None,
    center: bool = True,
    niter: int = 2,
) -> Factors:
    """Principal components of ``A`` (rows are samples), as ``torch.pca_lowrank``.

    ``A − 1·mean(A, dim=-2) ≈ U·diag(S)·Vᵀ`` with ``center=True`` (the centring is
    implicit: a sparse ``A`` is never densified); ``V [..., n, q]`` holds the principal
    directions, ``S² / (m − 1)`` the explained variances.

    Args:
        A: ``[..., m, n]`` dense or sparse (COO/CSR, ``[m, n]`` or ``[B, m, n]``).
        q: rank, ``0 <= q <= min(m, n)``; ``None``: ``min(6, m, n)``.
        center: subtract the column means first.
        niter: subspace iterations.

    Returns:
        ``U [..., m, q]``, ``S [..., q]``, ``V [..., n, q]``.
    """
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"A: expected a torch.Tensor, got {type(A).__name__}")
    if A.dim() < 2:
        raise ValueError(f"A: expected a tensor of shape [..., m, n] (at least 2 dims), got shape {tuple(A.shape)}")
    m, n = A.shape[-2:]
    q = min(6, m, n) if q is None else _check_q(q, m, n)
    niter = _check_niter(niter)
    if not isinstance(center, bool):
        raise TypeError(f"center: expected a bool, got {type(center).__name__}")
    if q == 0:
        return _empty(A)
    return _factors(rsvd(A, q, oversample=0, n_iter=niter, center=center or None))
