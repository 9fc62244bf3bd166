"""Sparse Bayesian learning with a Kronecker-structured dictionary and support (KroSBL).

Model (He, Xu et al., KroSBL for IRS-aided MIMO channel estimation): ``y = Φ·x + n`` with
``Φ = Φ₁ ⊗ Φ₂ ⊗ … ⊗ Φ_d`` (``Φ_i [M_i, L_i]``), ``n ~ CN(0, σ²I)`` and the prior
``x ~ N(0, diag(γ))`` with a Kronecker-structured variance ``γ = γ₁ ⊗ γ₂ ⊗ … ⊗ γ_d``:
the support of ``x`` is a product of supports (the non-zero angles of arrival × angles
of departure × IRS angles of an IRS-MIMO channel). The EM iteration:

    E-step (Woodbury, an M×M solve):  C = σ²I + Φ_a Γ Φ_aᴴ,  μ = Γ Φ_aᴴ C⁻¹ y,
                                      diag Σ = γ − γ² ⊙ diag(Φ_aᴴ C⁻¹ Φ_a)
    M-step: Λ = diag Σ + |μ|² (what plain SBL takes as γ); KroSBL takes the nearest
            Kronecker product instead, by SVDs: Λ reshaped L₁ × (L₂⋯L_d), its top
            singular pair gives γ₁ (left) and a remainder (right), which reshaped
            L₂ × (L₃⋯L_d) gives γ₂, and so on; γ = γ₁ ⊗ … ⊗ γ_d
            σ² = (‖y − Φμ‖² + σ² Σ_i (1 − Σ_ii/γ_i)) / M    (unless given)
    prune γ_i < prune·max γ (the support shrinks); stop when ‖Δγ‖/‖γ‖ < tol.

The Kronecker constraint pools the evidence of every entry sharing an index, so the
support is found from far fewer measurements than plain SBL needs.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch


class KronSBLResult(NamedTuple):
    """``x [N]`` posterior mean; ``gamma [N]`` prior variances (0 = pruned); ``factors``
    the ``γ_i [L_i]`` (plain SBL: empty); ``noise_var`` the (estimated) σ²; ``n_iter``."""

    x: torch.Tensor
    gamma: torch.Tensor
    factors: tuple[torch.Tensor, ...]
    noise_var: float
    n_iter: int


def _check(y: object, Phi_factors: object, max_iter: object, tol: object, noise_var: object, prune: object) -> None:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y: expected a torch.Tensor, got {type(y).__name__}")
    if y.dim() != 1:
        raise ValueError(f"y: expected a vector of shape [M], got shape {tuple(y.shape)}")
    ok_dtypes = (torch.float32, torch.float64, torch.complex64, torch.complex128)
    if y.dtype not in ok_dtypes:
        raise TypeError(f"y: expected dtype float32/float64/complex64/complex128, got {y.dtype}")
    if not isinstance(Phi_factors, Sequence) or isinstance(Phi_factors, torch.Tensor) or len(Phi_factors) == 0:
        raise TypeError(f"Phi_factors: expected a non-empty list of [M_i, L_i] tensors, got {type(Phi_factors).__name__}")
    for i, P in enumerate(Phi_factors):
        if not isinstance(P, torch.Tensor) or P.dim() != 2:
            got = tuple(P.shape) if isinstance(P, torch.Tensor) else type(P).__name__
            raise ValueError(f"Phi_factors[{i}]: expected a matrix [M_i, L_i], got {got}")
        if P.dtype not in ok_dtypes:
            raise TypeError(f"Phi_factors[{i}]: expected dtype float32/float64/complex64/complex128, got {P.dtype}")
        if P.device != y.device:
            raise ValueError(f"Phi_factors[{i}]: expected device {y.device} (that of y), got {P.device}")
        if not bool(torch.isfinite(P).all()):
            raise ValueError(f"Phi_factors[{i}]: expected finite entries, got NaN or Inf")
    rows = [P.shape[0] for P in Phi_factors]
    if math.prod(rows) != y.shape[0]:
        raise ValueError(
            f"Phi_factors: expected the factors' rows to multiply to len(y) = {y.shape[0]}, "
            f"got {' * '.join(map(str, rows))} = {math.prod(rows)}"
        )
    if not bool(torch.isfinite(y).all()):
        raise ValueError("y: expected finite entries, got NaN or Inf")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter: expected an int >= 1, got {max_iter!r}")
    for name, v in (("tol", tol), ("prune", prune)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < 1):
            raise ValueError(f"{name}: expected a float in (0, 1), got {v!r}")
    if noise_var is not None and (
        isinstance(noise_var, bool) or not isinstance(noise_var, (int, float)) or not (0 < noise_var < math.inf)
    ):
        raise ValueError(f"noise_var: expected None or a finite float > 0, got {noise_var!r}")


def nearest_kron_vector(Lam: torch.Tensor, sizes: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """Non-negative ``γ_i [L_i]`` with ``γ₁ ⊗ … ⊗ γ_d`` the successive rank-one (SVD)
    approximation of the non-negative ``Lam [ΠL_i]`` (KroSBL's hyperparameter update).

    Each step reshapes what is left ``L_i × (L_{i+1}⋯L_d)`` and keeps its top singular
    pair (non-negative by Perron–Frobenius: signs taken as +), splitting the singular
    value evenly between the two sides.
    """
    factors = []
    rest = Lam
    for L in sizes[:-1]:
        U, S, Vh = torch.linalg.svd(rest.reshape(L, -1), full_matrices=False)
        root = S[0].sqrt()
        factors.append(U[:, 0].abs() * root)
        rest = Vh[0].abs() * root
    factors.append(rest)
    return tuple(factors)


def _kron_all(mats: Sequence[torch.Tensor]) -> torch.Tensor:
    out = mats[0]
    for M in mats[1:]:
        out = torch.kron(out, M)
    return out


def kron_sbl(
    y: torch.Tensor,
    Phi_factors: Sequence[torch.Tensor],
    *,
    max_iter: int = 200,
    tol: float = 1e-4,
    noise_var: Optional[float] = None,
    prune: float = 1e-3,
    structured: bool = True,
) -> KronSBLResult:
    """Sparse recovery of ``x`` from ``y = (Φ₁ ⊗ … ⊗ Φ_d)·x + n`` by KroSBL (see the module docstring).

    Args:
        y: ``[M]`` measurements, real or complex.
        Phi_factors: ``[Φ₁ [M₁, L₁], …, Φ_d [M_d, L_d]]`` with ``ΠM_i = M``; the
            dictionary ``Φ`` (``[M, ΠL_i]``) is formed once (the E-step needs its columns).
        max_iter: most EM iterations.
        tol: stop when ``‖γ − γ_prev‖ / ‖γ_prev‖ < tol`` (the paper: 1e-4).
        noise_var: the noise variance σ² if known; ``None`` estimates it by EM.
        prune: entries with ``γ_i < prune·max γ`` leave the support (the paper: 1e-3).
        structured: ``False`` runs plain SBL (``γ = Λ``, no Kronecker constraint), the
            baseline KroSBL improves on.

    Returns:
        :class:`KronSBLResult` ``(x [N], gamma [N], factors, noise_var, n_iter)``.
    """
    _check(y, Phi_factors, max_iter, tol, noise_var, prune)
    if not isinstance(structured, bool):
        raise TypeError(f"structured: expected a bool, got {type(structured).__name__}")
    complex_ = y.is_complex() or any(P.is_complex() for P in Phi_factors)
    real_dtype = torch.float64 if (y.dtype in (torch.float64, torch.complex128) or any(P.dtype in (torch.float64, torch.complex128) for P in Phi_factors)) else torch.float32
    dtype = (torch.complex128 if real_dtype == torch.float64 else torch.complex64) if complex_ else real_dtype
    Phi = _kron_all([P.to(dtype) for P in Phi_factors])  # [M, N]
    y = y.to(dtype)
    M, N = Phi.shape
    sizes = [P.shape[1] for P in Phi_factors]
    gamma = torch.ones(N, dtype=real_dtype, device=y.device)
    # σ² starts at 10% of the measurement power: SBL's customary start when unknown.
    sigma2 = float(noise_var) if noise_var is not None else max(0.1 * float(y.abs().pow(2).mean()), 1e-30)
    factors: tuple[torch.Tensor, ...] = ()
    mu = torch.zeros(N, dtype=dtype, device=y.device)
    eye = torch.eye(M, dtype=dtype, device=y.device)
    it = 0
    for it in range(1, max_iter + 1):
        active = gamma > prune * gamma.max()
        Pa = Phi[:, active]
        ga = gamma[active]
        C = sigma2 * eye + (Pa * ga.to(dtype)) @ Pa.mH
        Cinv_Pa = torch.linalg.solve(C, Pa)  # C⁻¹Φ_a, [M, |a|]
        Cinv_y = torch.linalg.solve(C, y.unsqueeze(-1))[:, 0]
        mu_a = ga.to(dtype) * (Pa.mH @ Cinv_y)
        sigma_diag = (ga - ga.pow(2) * (Pa.conj() * Cinv_Pa).sum(0).real).clamp_min(0)
        Lam = torch.zeros(N, dtype=real_dtype, device=y.device)
        Lam[active] = sigma_diag + mu_a.abs().pow(2)
        if structured:
            factors = nearest_kron_vector(Lam, sizes)
            new_gamma = _kron_all([f.unsqueeze(0) for f in factors])[0]
        else:
            new_gamma = Lam
        mu = torch.zeros(N, dtype=dtype, device=y.device)
        mu[active] = mu_a
        if noise_var is None:
            resid = (y - Pa @ mu_a).abs().pow(2).sum()
            slack = (1 - sigma_diag / ga.clamp_min(torch.finfo(real_dtype).tiny)).sum()
            sigma2 = max(float((resid + sigma2 * slack) / M), 1e-30)
        change = float((new_gamma - gamma).norm() / gamma.norm().clamp_min(torch.finfo(real_dtype).tiny))
        gamma = new_gamma
        if change < tol:
            break
    gamma = torch.where(gamma > prune * gamma.max(), gamma, torch.zeros_like(gamma))
    mu = torch.where(gamma > 0, mu, torch.zeros_like(mu))
    return KronSBLResult(mu, gamma, factors, sigma2, it)
