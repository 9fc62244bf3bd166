"""Spectral metrics on tensors, batched over leading dimensions.

Every function takes ``[..., m, n]`` matrices (or ``[..., p]`` spectra) in
float32, float16 or bfloat16 (float64 too: the tests' exact oracle), works in
float32/float64 internally and returns one value per matrix of the batch.

- :func:`singular_values`: all singular values, exactly (or to a requested
  ``rtol`` at float32 cost), one batched call;
- :func:`effective_rank` (Roy & Vetterli 2007), :func:`stable_rank`;
- :func:`nuclear_norm` exact, or its L1,2 surrogate (:func:`l12_norm`, Li et al.
  2024, "Large Language Model Evaluation via Matrix Nuclear-Norm");
- :func:`matrix_nuclear_norm_score`: that paper's score of hidden states;
- :func:`intruder_dimensions` (Shuttleworth et al. 2024, "LoRA vs Full
  Fine-tuning: An Illusion of Equivalence").
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from svdkernels.errors import all_finite

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_DTYPE_NAMES = "float32, float16, bfloat16 or float64"

__all__ = [
    "IntruderResult",
    "check_matrix",
    "effective_rank",
    "intruder_dimensions",
    "l12_norm",
    "matrix_nuclear_norm_score",
    "nuclear_norm",
    "singular_values",
    "stable_rank",
]


def check_matrix(A: torch.Tensor, name: str, *, min_dims: int = 2, finite: bool = True) -> None:
    """``TypeError``/``ValueError`` naming ``name`` unless ``A`` is a floating
    tensor with at least ``min_dims`` dims (``[..., m, n]``), no empty dim and,
    when ``finite``, no NaN/inf entry."""
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(A).__name__}")
    if A.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype {_DTYPE_NAMES}, got {A.dtype}")
    if A.dim() < min_dims:
        shape = "[..., m, n]" if min_dims == 2 else f"at least {min_dims} dims"
        raise ValueError(f"{name}: expected a tensor of shape {shape}, got shape {tuple(A.shape)}")
    if A.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(A.shape)}")
    if finite and not all_finite(A):
        raise ValueError(f"{name}: expected finite values, got NaN or inf entries")


def _check_spectrum(S: torch.Tensor, name: str = "S") -> None:
    check_matrix(S, name, min_dims=1)
    if bool((S < 0).any()):
        raise ValueError(f"{name}: expected non-negative singular values, got a negative entry")


def singular_values(A: torch.Tensor, *, k: Optional[int] = None, rtol: Optional[float] = None) -> torch.Tensor:
    """All (or the top ``k``) singular values of every matrix of a batch, descending.

    ``σ_i = sqrt(λ_i)``, ``λ_i`` the eigenvalues of the Gram matrix of the smaller
    side (``AᵀA`` or ``AAᵀ``); no singular vectors are formed. The Gram's lower
    triangle is formed block by block (its upper blocks are never computed) and its
    eigenvalues come from :func:`svdkernels.ops.sym_eigvalsh` (one matrix per CPU
    thread; ``torch.linalg.eigvalsh`` off the CPU or without the C++ extension).

    Accuracy, by ``rtol``:

    - ``None`` (default): float64 Gram and eigenvalues. The absolute error of ``σ_i²``
      is ~1e-16·σ_1², so ``σ_i`` is exact to ~1e-6 relative down to ``σ_i ≈ 1e-5·σ_1``.
    - a number in ``[1e-6, 1)``: every returned value within ``rtol`` relative, at
      float32 cost where that suffices. Float32 Gram and eigenvalues first; with
      ``p = min(m, n)``, ``q = max(m, n)`` and ``u = 2⁻²⁴``, the standard rounding
      model bounds their error by ``|λ̂_i − λ_i| ≤ δ = (p + sqrt(q))·u·λ̂_1`` (the Gram's
      sums, ~sqrt(q)·u, and the backward-stable eigensolver, ~p·u; MiniLM's weights
      and random matrices stay ≥ 10x inside it), hence
      ``|σ̂_i − σ_i| / σ_i ≤ δ / (σ_lo·(σ̂_i + σ_lo))``, ``σ_lo = sqrt(max(λ̂_i − δ, 0))``.
      The matrices where that exceeds ``rtol`` for a returned value are recomputed
      in float64 (the default route). Float32 alone reaches ``rtol`` for values
      above ``σ_1·sqrt(δ/λ̂_1/rtol)`` (≈ 0.15·σ_1 at ``rtol = 1e-3`` for 384 columns):
      ask for the top ``k`` to keep ill-conditioned matrices (a long small tail) on
      the float32 route.

    Args:
        A: ``[..., m, n]`` floating tensor.
        k: keep the ``k`` largest values (``1 <= k <= min(m, n)``); all by default.
        rtol: ``None`` or the relative accuracy wanted of every returned value (above).

    Returns:
        ``[..., min(m, n)]`` (or ``[..., k]``) float32, descending.
    """
    check_matrix(A, "A")
    m, n = A.shape[-2:]
    p = min(m, n)
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k: expected an int or None, got {type(k).__name__}")
        if not 1 <= k <= p:
            raise ValueError(f"k: expected 1 <= k <= min(m, n) = {p}, got {k}")
    if rtol is not None:
        if isinstance(rtol, bool) or not isinstance(rtol, (int, float)):
            raise TypeError(f"rtol: expected a float or None, got {type(rtol).__name__}")
        if not 1e-6 <= rtol < 1:
            raise ValueError(f"rtol: expected a number in [1e-6, 1) (1e-6: the float64 route's accuracy), got {rtol!r}")
        S = _gram_singular_values(A, torch.float32)
        bad = _float32_bound(S, m, n, k) > rtol  # [...] matrices float32 does not certify
        if bool(bad.any()):
            S[bad] = _gram_singular_values(A[bad], torch.float64)
    else:
        S = _gram_singular_values(A, torch.float64)
    return S[..., :k] if k is not None else S


# Column blocks of the Gram's lower triangle: 4 blocks compute 10/16 of the product.
_GRAM_BLOCKS = 4


def gram_lower(A: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The Gram matrix of the smaller side of ``A`` ``[..., m, n]`` in ``dtype``,
    ``[..., p, p]`` (``p = min(m, n)``), lower triangle only: the blocks above the
    diagonal are zero and never computed (symmetric eigensolvers read one triangle).
    The whole Gram when ``A`` needs a gradient.
    """
    X = A.to(dtype)
    if X.shape[-2] < X.shape[-1]:
        X = X.mT  # AAᵀ = (Aᵀ)ᵀ(Aᵀ): a view; matmul takes the strides
    if X.requires_grad and torch.is_grad_enabled():
        # Autograd of eigvalsh takes the matrix as symmetric: give it the whole Gram.
        return X.mT @ X
    p = X.shape[-1]
    G = X.new_zeros(*X.shape[:-2], p, p)
    cuts = [p * i // _GRAM_BLOCKS for i in range(_GRAM_BLOCKS + 1)] if p >= 64 * _GRAM_BLOCKS else [0, p]
    for i in range(len(cuts) - 1):
        rows = slice(cuts[i], cuts[i + 1])
        Xi = X[..., rows].mT
        # The block row left of and on the diagonal, in one product.
        G[..., rows, : cuts[i + 1]] = Xi @ X[..., : cuts[i + 1]]
    return G


def _gram_singular_values(A: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """All singular values, descending, float32, from the ``dtype`` Gram's eigenvalues."""
    from svdkernels.ops.sym_eigvalsh import sym_eigvalsh

    lam = sym_eigvalsh(gram_lower(A, dtype)).flip(-1)  # ascending → descending
    return lam.clamp_min(0).sqrt().float()


def _float32_bound(S: torch.Tensor, m: int, n: int, k: Optional[int]) -> torch.Tensor:
    """``[...]``: the largest relative error bound (see :func:`singular_values`) of the
    returned values (the top ``k``; all when ``None``) of float32-route spectra ``S``."""
    u = 2.0 ** -24
    lam = S.double().pow(2)[..., :k] if k is not None else S.double().pow(2)
    delta = (min(m, n) + max(m, n) ** 0.5) * u * lam[..., :1]
    lo = (lam - delta).clamp_min(0).sqrt()
    bound = delta / (lo * (lam.sqrt() + lo))
    # λ̂_i ≤ δ: no lower bound on σ_i, so no relative bound (inf, also for 0/0).
    return torch.where(lo > 0, bound, torch.full_like(bound, float("inf"))).amax(-1)


def effective_rank(S: torch.Tensor) -> torch.Tensor:
    """Effective rank of Roy & Vetterli (2007): ``exp(H(p))``, ``p_i = σ_i / Σ_j σ_j``,
    ``H(p) = −Σ p_i log p_i`` (``0·log 0 = 0``).

    It lies in ``[1, p]``: 1 for a rank-1 matrix, ``p`` for equal singular values.

    Args:
        S: ``[..., p]`` non-negative singular values (any order).

    Returns:
        ``[...]`` float32. An all-zero spectrum (a zero matrix) has effective rank 0
        (the convention rank(0) = 0: ``p`` is undefined there).
    """
    _check_spectrum(S)
    s = S.double()
    total = s.sum(-1, keepdim=True)
    p = s / total.clamp_min(torch.finfo(torch.float64).tiny)
    h = -torch.special.xlogy(p, p).sum(-1)
    return torch.where(total.squeeze(-1) > 0, h.exp(), torch.zeros_like(h)).float()


def stable_rank(S: torch.Tensor) -> torch.Tensor:
    """Stable rank ``‖A‖_F² / ‖A‖_2² = Σ σ_i² / max_i σ_i²`` (Rudelson & Vershynin).

    Args:
        S: ``[..., p]`` non-negative singular values (any order).

    Returns:
        ``[...]`` float32 in ``[1, p]``; 0 for an all-zero spectrum.
    """
    _check_spectrum(S)
    s2 = S.double().pow(2)
    top = s2.amax(-1)
    r = s2.sum(-1) / top.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(top > 0, r, torch.zeros_like(r)).float()


def l12_norm(A: torch.Tensor) -> torch.Tensor:
    """The L1,2 norm ``Σ_j ‖A[:, j]‖_2`` (the sum of the column norms), O(mn).

    The Matrix Nuclear-Norm paper's surrogate of the nuclear norm. Bounds (the
    nuclear norm is a norm and ``A = Σ_j A[:, j] e_jᵀ`` with ``‖a eᵀ‖_* = ‖a‖``;
    Cauchy–Schwarz on the right)::

        ‖A‖_F ≤ ‖A‖_* ≤ ‖A‖_{1,2} ≤ sqrt(n)·‖A‖_F ≤ sqrt(n)·‖A‖_*

    Args:
        A: ``[..., m, n]`` floating tensor.

    Returns:
        ``[...]`` float32.
    """
    check_matrix(A, "A", finite=False)
    return torch.linalg.vector_norm(A.float(), dim=-2).sum(-1)


def nuclear_norm(A: torch.Tensor, *, exact: bool = True) -> torch.Tensor:
    """Nuclear norm ``‖A‖_* = Σ σ_i`` of every matrix of a batch.

    Args:
        A: ``[..., m, n]`` floating tensor.
        exact: ``True``: the sum of the singular values (:func:`singular_values`,
            one batched call). ``False``: the L1,2 surrogate of the Matrix
            Nuclear-Norm paper (:func:`l12_norm`, no SVD; an upper bound within a
            factor ``sqrt(n)``).

    Returns:
        ``[...]`` float32.
    """
    if not isinstance(exact, bool):
        raise TypeError(f"exact: expected a bool, got {type(exact).__name__}")
    if not exact:
        return l12_norm(A)
    return singular_values(A).double().sum(-1).float()


def matrix_nuclear_norm_score(hidden_states: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The Matrix Nuclear-Norm score of Li et al. (2024) for each sequence of a batch.

    For a sequence's hidden states ``R`` (``N`` valid tokens × ``d``): centre ``R``
    over its tokens, L2-normalise each row, take the L2 norm of every column and
    sum the ``D = min(N, d)`` largest, then divide by ``N``. Padded tokens
    (``mask == 0``) take no part: neither in the mean, nor in ``N``, nor in the norms.

    Args:
        hidden_states: ``[..., N, d]`` (e.g. the last hidden states ``[B, N, d]``).
        mask: ``[..., N]`` bool or 0/1 (e.g. the tokenizer's ``attention_mask``);
            all tokens valid when ``None``.

    Returns:
        ``[...]`` float32 scores (0 for a sequence with no valid token).
    """
    check_matrix(hidden_states, "hidden_states")
    *lead, N, d = hidden_states.shape
    if mask is None:
        valid = torch.ones(hidden_states.shape[:-1], dtype=torch.bool, device=hidden_states.device)
    else:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask: expected a torch.Tensor or None, got {type(mask).__name__}")
        if tuple(mask.shape) != tuple(hidden_states.shape[:-1]):
            raise ValueError(
                f"mask: expected shape {tuple(hidden_states.shape[:-1])} (hidden_states without its last dim), "
                f"got {tuple(mask.shape)}")
        valid = mask.to(device=hidden_states.device) != 0
    w = valid.unsqueeze(-1).float()  # [..., N, 1]
    R = hidden_states.float() * w
    n_tok = w.sum(-2)  # [..., 1]
    R = (R - R.sum(-2, keepdim=True) / n_tok.clamp_min(1).unsqueeze(-1)) * w  # centred over valid tokens only
    R = R / torch.linalg.vector_norm(R, dim=-1, keepdim=True).clamp_min(1e-12)
    cols = torch.linalg.vector_norm(R, dim=-2)  # [..., d]
    cols = cols.sort(-1, descending=True).values
    D = torch.minimum(n_tok, torch.tensor(float(d), device=n_tok.device))  # [..., 1]
    keep = torch.arange(d, device=cols.device) < D
    score = (cols * keep).sum(-1) / n_tok.squeeze(-1).clamp_min(1)
    return score


class IntruderResult(NamedTuple):
    """What :func:`intruder_dimensions` finds, for ``k`` top vectors of each matrix.

    ``count`` ``[...]`` int64: intruders per matrix; ``mask`` ``[..., k]`` bool: which
    of the top-``k`` left singular vectors of ``W_ft`` are intruders;
    ``similarity`` ``[..., k]`` float32: each one's largest ``|cos|`` with any left
    singular vector of ``W_base``; ``singular_values`` ``[..., k]`` float32 of ``W_ft``.
    """

    count: torch.Tensor
    mask: torch.Tensor
    similarity: torch.Tensor
    singular_values: torch.Tensor


def intruder_dimensions(
    W_base: torch.Tensor, W_ft: torch.Tensor, *, k: int = 10, eps: float = 0.5
) -> IntruderResult:
    """Intruder dimensions (Shuttleworth et al. 2024) of fine-tuned weights.

    A top-``k`` left singular vector ``u`` of the fine-tuned weight is an intruder
    when ``max_i |⟨u, u0_i⟩| < eps`` over every left singular vector ``u0_i`` of
    the base weight. As the authors use it, ``W_ft`` is the *merged* weight
    (``W_base + B·A`` for LoRA), not the update.

    Both SVDs are exact and batched (one ``torch.linalg.svd`` call per argument).

    Args:
        W_base: ``[..., m, n]`` pre-trained weights.
        W_ft: ``[..., m, n]`` fine-tuned (merged) weights, same shape.
        k: how many top singular vectors of ``W_ft`` to test (authors: 10).
        eps: cosine threshold (authors: 0.5), in ``(0, 1]``.

    Returns:
        :class:`IntruderResult`.
    """
    check_matrix(W_base, "W_base")
    check_matrix(W_ft, "W_ft")
    if W_base.shape != W_ft.shape:
        raise ValueError(f"W_ft: expected the shape of W_base {tuple(W_base.shape)}, got {tuple(W_ft.shape)}")
    p = min(W_base.shape[-2:])
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k: expected an int, got {type(k).__name__}")
    if not 1 <= k <= p:
        raise ValueError(f"k: expected 1 <= k <= min(m, n) = {p}, got {k}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= 1:
        raise ValueError(f"eps: expected a number in (0, 1], got {eps!r}")
    U0 = torch.linalg.svd(W_base.float(), full_matrices=False)[0]  # [..., m, p]
    U, S, _ = torch.linalg.svd(W_ft.float(), full_matrices=False)
    U, S = U[..., :k], S[..., :k]
    sim = (U0.mT @ U).abs().amax(-2)  # [..., k]: best match of each fine-tuned vector
    mask = sim < eps
    return IntruderResult(mask.sum(-1), mask, sim, S)
