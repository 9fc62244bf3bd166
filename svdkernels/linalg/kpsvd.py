"""KPSVD: the nearest sum of Kronecker products to a matrix (Van Loan & Pitsianis 1993).

For ``W`` of shape ``(a1·b1)×(a2·b2)`` the rearrangement ``R(W)`` of shape
``(a1·a2)×(b1·b2)`` has rows ``vec(A-block)`` and columns ``vec(B-block)``::

    R(W)[p·a2 + s, q·b2 + t] = W[p·b1 + q, s·b2 + t]

and maps ``A ⊗ B`` to the rank-one ``vec(A)·vec(B)ᵀ``. So the SVD
``R(W) = Σ_k σ_k·u_k·v_kᵀ`` gives ``W = Σ_k σ_k·A_k ⊗ B_k`` with ``A_k = u_k``
reshaped ``a1×a2`` and ``B_k = v_k`` reshaped ``b1×b2``, and truncating it at ``K``
terms is the best ``K``-term approximation in the Frobenius norm (Eckart–Young on
``R(W)``, which preserves the Frobenius norm): the error is the tail
``sqrt(Σ_{k>K} σ_k²)`` of the rearranged spectrum. SoKA (Kronecker adapters)
initialises from it and picks ``K`` by an energy threshold or the spectrum's elbow.
"""
from __future__ import annotations

from typing import Optional

import torch

from svdkernels.ops.rsvd import rsvd
from svdkernels.linalg.select_rank import select_rank

Shape2 = tuple[int, int]


def _shape2(name: str, shape: object) -> Shape2:
    if (not isinstance(shape, (tuple, list)) or len(shape) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape)):
        raise ValueError(f"{name}: expected a pair of positive ints, got {shape!r}")
    return int(shape[0]), int(shape[1])


def rearrange(W: torch.Tensor, a_shape: Shape2, b_shape: Shape2) -> torch.Tensor:
    """``R(W) [..., a1·a2, b1·b2]`` of ``W [..., a1·b1, a2·b2]`` (one copy of W)."""
    (a1, a2), (b1, b2) = a_shape, b_shape
    *batch, _, _ = W.shape
    return (W.reshape(*batch, a1, b1, a2, b2)
             .transpose(-3, -2)  # [..., a1, a2, b1, b2]
             .reshape(*batch, a1 * a2, b1 * b2))


def kron_sum(sigma: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Dense ``Σ_k σ_k·A_k ⊗ B_k`` ``[..., a1·b1, a2·b2]`` (for tests and merging).

    ``sigma [..., K]``, ``A [..., K, a1, a2]``, ``B [..., K, b1, b2]``.
    """
    *batch, K, a1, a2 = A.shape
    b1, b2 = B.shape[-2:]
    W = torch.einsum("...k,...kps,...kqt->...pqst", sigma.to(A.dtype), A, B)
    return W.reshape(*batch, a1 * b1, a2 * b2)


def kpsvd(
    W: torch.Tensor,
    a_shape: Shape2,
    b_shape: Shape2,
    *,
    rank: Optional[int] = None,
    energy: Optional[float] = None,
    elbow: bool = False,
    seed: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kronecker-product SVD: ``W ≈ Σ_k sigma_k · A_k ⊗ B_k``, batched.

    Args:
        W: ``[..., a1*b1, a2*b2]`` float32/bfloat16/float16 (computed in float32).
        a_shape: ``(a1, a2)``, the shape of each ``A_k``.
        b_shape: ``(b1, b2)``, the shape of each ``B_k``.
        rank: number of Kronecker terms ``K``. With ``energy``/``elbow`` it is an
            upper bound.
        energy: keep the fewest terms carrying this fraction (in (0, 1]) of
            ``‖W‖_F²`` (SoKA's energy threshold).
        elbow: keep the terms up to the elbow of the rearranged spectrum (Kneedle).
        seed: seed of the randomized SVD (used when ``rank`` alone is given).

    Returns:
        ``sigma [..., K]`` descending, ``A [..., K, a1, a2]`` and ``B [..., K, b1, b2]``
        with unit Frobenius norm, all float32. With ``rank`` alone it comes from
        :func:`svdkernels.rsvd` of the rearranged matrix (exact when ``W`` is a sum
        of at most ``rank`` Kronecker products, to fp tolerance). With
        ``energy``/``elbow`` the whole rearranged spectrum is needed, so it comes
        from an exact SVD, and ``K`` is the largest rank selected over the batch:
        a batch element that selected fewer terms has ``sigma = 0`` (and zero
        factors) beyond its own rank.
    """
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"W: expected a torch.Tensor, got {type(W).__name__}")
    if W.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"W: expected dtype float32, float16 or bfloat16, got {W.dtype}")
    if W.dim() < 2:
        raise ValueError(f"W: expected shape [..., a1*b1, a2*b2], got {tuple(W.shape)}")
    (a1, a2), (b1, b2) = _shape2("a_shape", a_shape), _shape2("b_shape", b_shape)
    m, n = W.shape[-2:]
    if (m, n) != (a1 * b1, a2 * b2):
        raise ValueError(f"a_shape, b_shape: expected a1*b1 x a2*b2 to equal W's {m} x {n}, "
                         f"got {a1}*{b1} x {a2}*{b2} = {a1 * b1} x {a2 * b2}")
    full = min(a1 * a2, b1 * b2)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full):
        raise ValueError(f"rank: expected an int in [1, min(a1*a2, b1*b2)] = [1, {full}], got {rank!r}")
    if rank is None and energy is None and not elbow:
        raise ValueError("rank, energy, elbow: expected at least one of rank, energy or elbow=True, got none")
    if not bool(torch.isfinite(W).all()):
        raise ValueError("W: expected finite values, got NaN or inf")
    *batch, _, _ = W.shape
    R = rearrange(W.float(), (a1, a2), (b1, b2))
    if energy is None and not elbow:
        U, S, Vh = rsvd(R, rank, seed=seed)
    else:
        U, S, Vh = torch.linalg.svd(R, full_matrices=False)
        keep = select_rank(S, energy=energy, elbow=elbow, max_rank=rank)  # [...]
        K = int(keep.max()) if keep.numel() else (rank or 1)
        U, S, Vh = U[..., :K], S[..., :K], Vh[..., :K, :]
        live = torch.arange(K, device=S.device) < keep.unsqueeze(-1)  # [..., K]
        S = S * live
        U = U * live.unsqueeze(-2)
        Vh = Vh * live.unsqueeze(-1)
    K = S.shape[-1]
    A = U.transpose(-1, -2).reshape(*batch, K, a1, a2)
    B = Vh.reshape(*batch, K, b1, b2)
    return S, A.contiguous(), B.contiguous()
