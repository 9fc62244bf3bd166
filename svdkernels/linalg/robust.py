"""Robust SVD by the minimum density power divergence (rSVDdpd).

Roy, Basu & Ghosh (2021), "Robust singular value decomposition with application to
video surveillance background modelling". The plain SVD minimises squared error, so a
few gross outliers (a person walking through the scene, a covered camera, salt and
pepper noise) pull its leading vectors towards them. rSVDdpd fits one rank-one term
``λ·a·bᵀ`` at a time by minimising the density power divergence (DPD) of a Gaussian
error model, which down-weights each entry by ``w_ij = exp(−α·r_ij²/(2σ²))``:

    X ← X / IQR(X)                                    (scale-free start, undone at the end)
    for each term (with deflation X ← X − λ·u·vᵀ):
        a, b from the plain SVD pair of X clipped to median ± 3·MAD; σ² from the residuals' MAD
        repeat:                                        (alternating weighted updates)
            w_ij = exp(−α (X_ij − a_i b_j)² / 2σ²)
            a_i  = Σ_j w_ij X_ij b_j / Σ_j w_ij b_j²
            b_j  = Σ_i w_ij X_ij a_i / Σ_i w_ij a_i²
            σ²   = Σ w r² / (Σ w − N·α/(1+α)^{3/2})     (the DPD estimating equation of σ)
        until the rank-one term changes by < tol (relative), at most max_iter times
        λ = ‖a‖·‖b‖, u = a/‖a‖, v = b/‖b‖

``α → 0`` is the plain (least-squares) SVD; the authors recommend ``α = 0.3``.
Entries whose residual is many ``σ`` away get weight ≈ 0, so the background of a video
(a low-rank matrix of pixels × frames) is recovered through the moving foreground.
"""
from __future__ import annotations

import torch

from svdkernels.ops.rsvd import rsvd

Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _check(X: object, rank: object, alpha: object, max_iter: object, tol: object) -> None:
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"X: expected a torch.Tensor, got {type(X).__name__}")
    if X.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"X: expected dtype float32 or float64, got {X.dtype}")
    if X.layout != torch.strided:
        raise TypeError(f"X: expected a dense (strided) tensor, got layout {X.layout}")
    if X.dim() < 2:
        raise ValueError(f"X: expected a tensor of shape [..., m, n] (at least 2 dims), got shape {tuple(X.shape)}")
    for name, v in (("rank", rank), ("max_iter", max_iter)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    m, n = X.shape[-2:]
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank: expected 1 <= rank <= min(m, n) = {min(m, n)}, got {rank}")
    if max_iter < 1:
        raise ValueError(f"max_iter: expected >= 1, got {max_iter}")
    for name, v in (("alpha", alpha), ("tol", tol)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name}: expected a float, got {type(v).__name__}")
    if not (0 < alpha < float("inf")):
        raise ValueError(f"alpha: expected a finite float > 0 (0 would be the plain SVD), got {alpha}")
    if not (0 < tol < float("inf")):
        raise ValueError(f"tol: expected a finite float > 0, got {tol}")
    if X.numel() and not bool(torch.isfinite(X).all()):
        raise ValueError("X: expected finite entries, got NaN or Inf (outliers must be finite numbers)")


def _iqr(X: torch.Tensor) -> torch.Tensor:
    """``[B, 1, 1]`` interquartile range of each matrix's entries (1 where it is 0)."""
    flat = X.flatten(1)
    q = torch.quantile(flat, torch.tensor([0.25, 0.75], dtype=X.dtype, device=X.device), dim=1)
    iqr = (q[1] - q[0]).reshape(-1, 1, 1)
    return torch.where(iqr > 0, iqr, torch.ones_like(iqr))


def robust_svd(
    X: torch.Tensor,
    rank: int,
    *,
    alpha: float = 0.3,
    max_iter: int = 100,
    tol: float = 1e-4,
) -> Factors:
    """rSVDdpd: a rank-``rank`` SVD of ``X`` that resists gross outliers (see the module docstring).

    Args:
        X: ``[..., m, n]`` float32/float64, finite (an outlier is a large finite
            value; a missing entry has no place here). Batched over leading dims.
        rank: number of terms, ``1 <= rank <= min(m, n)``.
        alpha: DPD tuning parameter ``α > 0``: larger is more robust, less efficient
            on clean data (the authors: 0.3).
        max_iter: most alternating updates per term.
        tol: stop a term when ``‖a bᵀ − a' b'ᵀ‖_F / ‖a bᵀ‖_F < tol`` between updates.

    Returns:
        ``U [..., m, rank]``, ``S [..., rank]`` (descending), ``Vh [..., rank, n]``, in
        ``X``'s dtype. Columns of ``U`` (rows of ``Vh``) have unit norm; as in the
        paper they come from successive deflation and are orthogonal only
        approximately (exactly on outlier-free data).

    Example (background of a video of ``T`` frames of ``h×w`` pixels)::

        frames = video.reshape(T, h * w).T             # [pixels, frames]
        U, S, Vh = svdkernels.robust_svd(frames, 2)
        background = (U * S) @ Vh                       # [pixels, frames]
    """
    _check(X, rank, alpha, max_iter, tol)
    *batch, m, n = X.shape
    Xb = X.reshape(-1, m, n)
    B = Xb.shape[0]
    if B == 0:
        return X.new_empty(*batch, m, rank), X.new_empty(*batch, rank), X.new_empty(*batch, rank, n)
    scale = _iqr(Xb)
    R = Xb / scale  # residual being deflated
    c = alpha / (1.0 + alpha) ** 1.5 * m * n  # DPD correction term of the σ equation
    us, lams, vs = [], [], []
    for _ in range(rank):
        # Start from the plain SVD pair of the residual with every entry clipped to
        # median ± 3·MAD: gross outliers would otherwise choose the starting point,
        # and the weighted iteration converges to the term nearest to its start.
        flat = R.flatten(1)
        med = flat.median(dim=1).values.reshape(B, 1, 1)
        mad = 1.4826 * (R - med).abs().flatten(1).median(dim=1).values.reshape(B, 1, 1)
        clipped = torch.minimum(torch.maximum(R, med - 3 * mad), med + 3 * mad)
        U0, S0, Vh0 = rsvd(clipped, 1, oversample=min(5, min(m, n) - 1), n_iter=4, seed=0)
        a = U0[..., 0].to(R.dtype) * S0.to(R.dtype)  # [B, m]
        b = Vh0[..., 0, :].to(R.dtype)  # [B, n]
        resid = R - a.unsqueeze(-1) * b.unsqueeze(-2)
        # Robust start for σ: the residuals' median absolute deviation.
        sigma2 = (1.4826 * resid.abs().flatten(1).median(dim=1).values).pow(2).clamp_min(1e-30)
        done = torch.zeros(B, dtype=torch.bool, device=X.device)
        for _ in range(max_iter):
            w = torch.exp(-alpha * resid.pow(2) / (2 * sigma2.reshape(B, 1, 1)))
            wR = w * R
            a_new = (wR @ b.unsqueeze(-1))[..., 0] / (w @ b.pow(2).unsqueeze(-1))[..., 0].clamp_min(1e-300)
            b_new = (a_new.unsqueeze(-2) @ wR)[..., 0, :] / (a_new.pow(2).unsqueeze(-2) @ w)[..., 0, :].clamp_min(1e-300)
            fit_new = a_new.unsqueeze(-1) * b_new.unsqueeze(-2)
            resid = R - fit_new
            w = torch.exp(-alpha * resid.pow(2) / (2 * sigma2.reshape(B, 1, 1)))
            denom = (w.sum((-2, -1)) - c).clamp_min(1e-12 * m * n)
            sigma2_new = ((w * resid.pow(2)).sum((-2, -1)) / denom).clamp_min(1e-30)
            # ‖a bᵀ − a' b'ᵀ‖_F from the four inner products (no m×n difference needed).
            aa, bb = a.pow(2).sum(-1), b.pow(2).sum(-1)
            an, bn = a_new.pow(2).sum(-1), b_new.pow(2).sum(-1)
            cross = (a * a_new).sum(-1) * (b * b_new).sum(-1)
            change = (aa * bb + an * bn - 2 * cross).clamp_min(0).sqrt() / (an * bn).sqrt().clamp_min(1e-300)
            keep = done.reshape(B, 1)
            a = torch.where(keep, a, a_new)
            b = torch.where(keep, b, b_new)
            sigma2 = torch.where(done, sigma2, sigma2_new)
            done = done | (change < tol)
            if bool(done.all()):
                break
            resid = R - a.unsqueeze(-1) * b.unsqueeze(-2)
        na, nb = a.norm(dim=-1), b.norm(dim=-1)
        lam = na * nb
        u = a / na.clamp_min(1e-300).unsqueeze(-1)
        v = b / nb.clamp_min(1e-300).unsqueeze(-1)
        R = R - lam.reshape(B, 1, 1) * u.unsqueeze(-1) * v.unsqueeze(-2)
        us.append(u)
        lams.append(lam)
        vs.append(v)
    U = torch.stack(us, dim=-1)
    S = torch.stack(lams, dim=-1) * scale.reshape(B, 1)
    Vh = torch.stack(vs, dim=-2)
    order = S.argsort(dim=-1, descending=True)
    S = S.gather(-1, order)
    U = U.gather(-1, order.unsqueeze(-2).expand(B, m, rank))
    Vh = Vh.gather(-2, order.unsqueeze(-1).expand(B, rank, n))
    return U.reshape(*batch, m, rank), S.reshape(*batch, rank), Vh.reshape(*batch, rank, n)
