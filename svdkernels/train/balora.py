"""BA-LoRA's regularisers on output logits (Chang et al. 2024, "BA-LoRA: Bias-Alleviating
Low-Rank Adaptation to mitigate catastrophic inheritance in large language models").

Three terms, added to the task loss of a (PiSSA-initialised) adapter:

- **consistency** ``KL(p_base ‖ p)``: keep the fine-tuned output distribution near the
  frozen base model's (``p = softmax(logits)``, base detached), averaged over rows;
- **diversity**: minus the entropy of the top-``k`` probabilities renormalised, so that
  minimising it spreads the mass over the top candidates, averaged over rows;
- **svd**: ``−(σ_1 + … + σ_k) / norm`` of the batch of logits ``L [N, V]`` (``norm`` the
  nuclear norm ``Σσ`` or ``‖L‖_F``): rewards a batch whose logits are dominated by a few
  directions (the paper's singular-value regulariser for generation).

For a large vocabulary (``V > 4096``) the top singular values come from
:func:`svdkernels.rsvd` of rank ``k + 5`` (the reference code's ``svd_lowrank(q=k+5)``),
batched over leading dimensions. ``rsvd`` has no autograd formula, so each value is
taken as ``σ_i = u_iᵀ·L·v_i`` with its (detached) singular vectors: the value, and the
gradient ``∂σ_i/∂L = u_i·v_iᵀ`` of a simple singular value, exactly as the SVD gives them.
There the ``"nuclear"`` normaliser is the sum of the ``k + 5`` computed values (what
the reference code divides by); ``"fro"`` is exact on both routes.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from svdkernels.errors import check_finite_number
from svdkernels.ops.rsvd import rsvd

Tensor = torch.Tensor

RSVD_VOCAB = 4096
"""Vocabularies larger than this take the top singular values from rsvd (``route="auto"``)."""

_OVERSAMPLE = 5


def _check_logits(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor) or t.dim() < 2 or not t.is_floating_point():
        got = f"{t.dtype} {list(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        raise TypeError(f"{name}: expected a floating-point tensor [..., N, V] of logits, got {got}")
    return t


def _check_k(name: str, k: object, top: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name}: expected an int, got {type(k).__name__}")
    if not 1 <= k <= top:
        raise ValueError(f"{name}: expected 1 <= {name} <= {top}, got {k}")
    return k


def consistency_loss(logits: Tensor, base_logits: Tensor) -> Tensor:
    """``mean_rows KL(softmax(base) ‖ softmax(logits))``; ``base_logits`` is detached.
    ``logits``, ``base_logits [..., V]`` of the same shape; returns a scalar."""
    logits, base_logits = _check_logits("logits", logits), _check_logits("base_logits", base_logits)
    if base_logits.shape != logits.shape:
        raise ValueError(f"base_logits: expected the shape of logits {list(logits.shape)}, "
                         f"got {list(base_logits.shape)}")
    V = logits.shape[-1]
    log_p = F.log_softmax(logits.reshape(-1, V), dim=-1)
    log_q = F.log_softmax(base_logits.detach().reshape(-1, V).to(logits.dtype), dim=-1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")


def diversity_loss(logits: Tensor, top_k: int = 20) -> Tensor:
    """``−mean_rows H(q)`` with ``q`` the ``top_k`` largest probabilities of each row
    renormalised to sum 1. ``logits [..., V]``; returns a scalar."""
    logits = _check_logits("logits", logits)
    k = _check_k("top_k", top_k, logits.shape[-1])
    log_p = F.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
    top = log_p.topk(k, dim=-1).values
    log_q = top - torch.logsumexp(top, dim=-1, keepdim=True)
    return (log_q.exp() * log_q).sum(-1).mean()


def _top_values(L: Tensor, k: int, route: str, seed: int) -> tuple[Tensor, Tensor]:
    """``(σ_1..σ_k [..., k], all computed σ [..., q])`` of ``L [..., N, V]``."""
    N, V = L.shape[-2:]
    q = min(k + _OVERSAMPLE, N, V)
    if route == "exact":
        # LAPACK/cuSOLVER have no bfloat16/float16 SVD: singular values in float32, back in L's dtype.
        Lw = L.float() if L.dtype in (torch.bfloat16, torch.float16) else L
        # A non-finite matrix gives NaN values (LAPACK would raise instead; no host sync here),
        # so a NaN loss reaches the optimiser's non-finite gradient check as any other would.
        finite = torch.isfinite(Lw).all(-1).all(-1)[..., None, None]
        S = torch.linalg.svdvals(torch.where(finite, Lw, torch.zeros_like(Lw)))
        S = torch.where(finite[..., 0], S, torch.full_like(S, math.nan)).to(L.dtype)
        return S[..., :k], S
    with torch.no_grad():
        U, _, Vh = rsvd(L.detach(), q, seed=seed)
    S = torch.einsum("...ni,...nv,...iv->...i", U.to(L.dtype), L, Vh.to(L.dtype))
    return S[..., :k], S


def svd_loss(logits: Tensor, top_k: int = 20, *, norm: str = "nuclear", route: str = "auto", seed: int = 0) -> Tensor:
    """``−(σ_1 + … + σ_k) / norm(L)`` of each logits matrix ``L [..., N, V]``, averaged
    over the leading dimensions; ``norm`` is ``"nuclear"`` (``Σσ``) or ``"fro"``.

    ``route``: ``"exact"`` (``torch.linalg.svdvals``), ``"rsvd"`` (rank ``k + 5``
    :func:`svdkernels.rsvd` with ``seed``, see the module docstring), or ``"auto"``
    (rsvd when ``V > 4096``). ``top_k`` at most ``min(N, V)``."""
    L = _check_logits("logits", logits)
    k = _check_k("top_k", top_k, min(L.shape[-2:]))
    if norm not in ("nuclear", "fro"):
        raise ValueError(f"norm: expected 'nuclear' or 'fro', got {norm!r}")
    if route not in ("auto", "exact", "rsvd"):
        raise ValueError(f"route: expected 'auto', 'exact' or 'rsvd', got {route!r}")
    if route == "auto":
        route = "rsvd" if L.shape[-1] > RSVD_VOCAB else "exact"
    top, S = _top_values(L, k, route, seed)
    denom = S.sum(-1) if norm == "nuclear" else torch.linalg.matrix_norm(L)
    return -(top.sum(-1) / denom).mean()


def balora_loss(logits: Tensor, base_logits: Tensor, *, consistency: float = 1.0, diversity: float = 1.0,
                svd: float = 1.0, top_k: int = 20, svd_rank: Optional[int] = None, norm: str = "nuclear",
                route: str = "auto", seed: int = 0) -> Tensor:
    """BA-LoRA's regulariser: ``consistency·KL(p_base ‖ p) + diversity·(−H_topk) +
    svd·(−Σ_{i≤k}σ_i/norm)`` of the adapted model's ``logits [..., N, V]`` against the
    frozen base model's ``base_logits`` (same shape). Add it to the task loss.

    Args:
        consistency, diversity, svd: the terms' weights (>= 0; 0 skips a term's work).
            The paper tunes them per task; 1 each is a neutral default, not its setting.
        top_k: ``k`` of the entropy term (20 as the paper).
        svd_rank: ``k`` of the singular-value term (default ``top_k``, capped at
            ``min(N, V)``).
        norm, route, seed: of :func:`svd_loss`.

    The terms are :func:`consistency_loss`, :func:`diversity_loss`, :func:`svd_loss`.
    """
    weights = {n: check_finite_number(n, v, low=0.0) for n, v in
               (("consistency", consistency), ("diversity", diversity), ("svd", svd))}
    logits = _check_logits("logits", logits)
    top = torch.finfo(logits.dtype).max
    for n, w in weights.items():
        if w > top:  # the weight becomes inf in the logits' dtype, and inf·0 = NaN for a zero term
            raise ValueError(f"{n}: expected a finite number <= {top:g} (representable in the logits' dtype "
                             f"{logits.dtype}), got {w!r}")
    total = logits.new_zeros(())
    if weights["consistency"]:
        total = total + weights["consistency"] * consistency_loss(logits, base_logits)
    else:
        _check_logits("base_logits", base_logits)
    if weights["diversity"]:
        total = total + weights["diversity"] * diversity_loss(logits, top_k)
    if weights["svd"]:
        k = min(top_k, *logits.shape[-2:]) if svd_rank is None else svd_rank
        total = total + weights["svd"] * svd_loss(logits, k, norm=norm, route=route, seed=seed)
    return total
