"""Column selection by pivoted and strong rank-revealing QR.

- :func:`pivoted_qr`: Businger–Golub column-pivoted QR, stopped after ``k`` steps:
  ``A[..., perm] ≈ Q·R`` with the ``k`` columns of largest remaining norm first.
- :func:`select_columns` with ``method="strong_rrqr"``: Gu & Eisenstat (1996),
  Alg. 4. Starting from the pivoted QR's ``k`` columns ``I`` (``A[:, I] = Q·R11``,
  ``R12 = QᵀA[:, J]``, ``R22`` the rest), swap ``i ∈ I`` with ``j ∈ J`` while

      ρ_ij = sqrt((R11⁻¹R12)_ij² + (γ_j(R22) / ω_i(R11))²) > f

  (``γ_j`` = norm of column ``j`` of ``R22``, ``ω_i`` = 1 / norm of row ``i`` of
  ``R11⁻¹``). Each swap multiplies ``|det R11|`` by ``ρ_ij > f``, so it terminates,
  and at the end every entry of ``R11⁻¹R12`` is at most ``f`` in magnitude: the
  selected columns express every other column with bounded coefficients, and
  ``σ_i(R11) ≥ σ_i(A) / sqrt(1 + f²k(n−k))``.

HIR-Diff (hyperspectral restoration) picks ``k = 3`` bands this way (``f = 1.2``) from
the top-3 right singular vectors ``E [C, 3]`` of the image ``Y [HW, C]``: with
``bands = select_columns(E.T, 3)``, ``Ê = E·E[bands]⁻¹`` rebuilds the image from the
chosen bands, ``Y ≈ Y[:, bands]·Êᵀ``, exactly when ``Y`` has rank 3.
"""
from __future__ import annotations

import torch

METHODS = ("strong_rrqr", "pivoted_qr")


def _check(A: object, k: object) -> None:
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"A: expected a torch.Tensor, got {type(A).__name__}")
    if A.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"A: expected dtype float32 or float64, got {A.dtype}")
    if A.layout != torch.strided:
        raise TypeError(f"A: expected a dense (strided) tensor, got layout {A.layout}")
    if A.dim() < 2:
        raise ValueError(f"A: expected a tensor of shape [..., m, n] (at least 2 dims), got shape {tuple(A.shape)}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k: expected an int, got {type(k).__name__}")
    m, n = A.shape[-2:]
    if not 1 <= k <= min(m, n):
        raise ValueError(f"k: expected 1 <= k <= min(m, n) = {min(m, n)} for A of shape {tuple(A.shape)}, got {k}")
    if A.numel() and not bool(torch.isfinite(A).all()):
        raise ValueError("A: expected finite entries, got NaN or Inf")


def pivoted_qr(A: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Column-pivoted QR of ``A [..., m, n]``, ``k`` steps (Businger & Golub 1965), batched.

    At each step the column with the largest norm orthogonal to the columns chosen
    so far becomes the next pivot (Gram–Schmidt, twice, against the chosen ones).

    Returns:
        ``Q [..., m, k]`` orthonormal, ``R [..., k, n]`` with ``R[..., :, :k]`` upper
        triangular (|diagonal| non-increasing), and ``perm [..., n]`` (int64, the
        chosen columns first, the others in their order) with
        ``A[..., perm] ≈ Q·R + (a remainder orthogonal to Q)``; exact for ``k = rank(A)``.
    """
    _check(A, k)
    *batch, m, n = A.shape
    A3 = A.reshape(-1, m, n)
    B = A3.shape[0]
    Q = A3.new_zeros(B, m, k)
    chosen = torch.zeros(B, n, dtype=torch.bool, device=A.device)
    piv = torch.empty(B, k, dtype=torch.long, device=A.device)
    resid = A3.clone()
    rows = torch.arange(B, device=A.device)
    for i in range(k):
        norms = resid.pow(2).sum(-2).masked_fill(chosen, -1.0)
        p = norms.argmax(-1)
        piv[:, i] = p
        chosen[rows, p] = True
        q = A3[rows, :, p]  # [B, m]
        for _ in range(2):  # re-orthogonalised: one Gram–Schmidt pass loses orthogonality
            q = q - (Q[..., :i] @ (Q[..., :i].mT @ q.unsqueeze(-1)))[..., 0]
        nq = q.norm(dim=-1, keepdim=True)
        q = torch.where(nq > 0, q / nq.clamp_min(torch.finfo(A.dtype).tiny), torch.zeros_like(q))
        Q[..., i] = q
        resid = resid - q.unsqueeze(-1) * (q.unsqueeze(-2) @ resid)
    rest = (~chosen).nonzero()[:, 1].reshape(B, n - k)
    perm = torch.cat([piv, rest], dim=-1)
    R = Q.mT @ A3.gather(-1, perm.unsqueeze(-2).expand(B, m, n))
    R[..., :, :k] = R[..., :, :k].triu()  # below-diagonal entries are rounding only
    return Q.reshape(*batch, m, k), R.reshape(*batch, k, n), perm.reshape(*batch, n)


def _strong_swaps(A: torch.Tensor, idx: torch.Tensor, f: float, max_swaps: int) -> torch.Tensor:
    """Gu–Eisenstat swaps for one matrix ``A [m, n]`` starting from columns ``idx [k]``."""
    n = A.shape[-1]
    k = idx.numel()
    idx = idx.clone()
    for _ in range(max_swaps):
        mask = torch.ones(n, dtype=torch.bool, device=A.device)
        mask[idx] = False
        rest = mask.nonzero()[:, 0]
        if rest.numel() == 0:
            break
        Q, R11 = torch.linalg.qr(A[:, idx])
        R12 = Q.mT @ A[:, rest]
        gamma = (A[:, rest] - Q @ R12).norm(dim=0)  # column norms of R22
        eye = torch.eye(k, dtype=A.dtype, device=A.device)
        R11_inv = torch.linalg.solve_triangular(R11, eye, upper=True)
        N = R11_inv @ R12  # [k, n-k]
        inv_omega = R11_inv.norm(dim=1)  # 1/ω_i
        rho2 = N.pow(2) + (gamma.unsqueeze(0) * inv_omega.unsqueeze(1)).pow(2)
        flat = int(rho2.argmax())
        i, j = divmod(flat, rest.numel())
        if not bool(rho2[i, j] > f * f):
            break
        idx[i] = rest[j]
    return idx


def select_columns(A: torch.Tensor, k: int, *, method: str = "strong_rrqr", f: float = 1.2) -> torch.Tensor:
    """Indices ``[..., k]`` (int64) of ``k`` well-conditioned, representative columns of ``A [..., m, n]``.

    Args:
        A: ``[..., m, n]`` float32/float64, finite; batched over leading dims.
        k: number of columns, ``1 <= k <= min(m, n)``.
        method: ``"strong_rrqr"`` (Gu–Eisenstat, the default) or ``"pivoted_qr"``
            (the greedy pivots alone).
        f: strong RRQR bound ``f > 1`` on ``|R11⁻¹R12|`` (HIR-Diff uses 1.2). Smaller
            is better columns and more swaps.

    Returns:
        ``[..., k]`` column indices, in the order the pivoting ranked them (swapped
        columns take the place of those they replace).

    Example (HIR-Diff's band selection; ``cube [H, W, C]`` hyperspectral)::

        Y = cube.reshape(-1, C)                               # [HW, C]
        E = torch.linalg.svd(Y, full_matrices=False).Vh[:3].T # [C, 3]
        bands = svdkernels.select_columns(E.T, 3)            # 3 band indices
        E_hat = E @ torch.linalg.inv(E[bands])                # [C, 3]
        Y_rebuilt = Y[:, bands] @ E_hat.T                     # == Y when rank(Y) = 3
    """
    _check(A, k)
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if isinstance(f, bool) or not isinstance(f, (int, float)):
        raise TypeError(f"f: expected a float, got {type(f).__name__}")
    if not (1.0 < f < float("inf")):
        raise ValueError(f"f: expected a finite float > 1 (strong RRQR needs f > 1 to terminate), got {f}")
    *batch, m, n = A.shape
    _, _, perm = pivoted_qr(A, k)
    idx = perm[..., :k].reshape(-1, k)
    if method == "pivoted_qr":
        return idx.reshape(*batch, k)
    A3 = A.reshape(-1, m, n)
    # Each swap raises |det R11| by more than f, bounded by the product of column
    # norms: a generous cap on swaps only guards against rounding loops.
    max_swaps = 10 * k * n
    out = torch.stack([_strong_swaps(A3[b], idx[b], float(f), max_swaps) for b in range(A3.shape[0])]) if A3.shape[0] else idx
    return out.reshape(*batch, k)
