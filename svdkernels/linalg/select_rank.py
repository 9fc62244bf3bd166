"""Rank selection from a spectrum: the energy-threshold and elbow criteria.

SoKA (Kronecker adapters) picks the number of Kronecker components from the
KPSVD spectrum with these two criteria; they apply to any batch of spectra.
"""
from __future__ import annotations

from typing import Optional

import torch

from svdkernels.errors import strict_kwargs


def _energy_rank(S: torch.Tensor, energy: float) -> torch.Tensor:
    # Smallest r with sum_{i<r} σ_i² >= energy · sum σ_i² (σ² is the Frobenius
    # energy each component carries).
    e = S.double().pow(2)
    cum = e.cumsum(-1)
    total = cum[..., -1:]
    # A tiny relative slack absorbs rounding in the cumulative sum at energy=1.
    reached = cum >= energy * total * (1 - 1e-12)
    return reached.int().argmax(-1) + 1


def _elbow_rank(S: torch.Tensor) -> torch.Tensor:
    # Kneedle: the point of the curve (i, σ_i) farthest from the chord joining its
    # first and last points, both axes normalised to [0, 1]; r counts the points up
    # to and including the elbow.
    p = S.shape[-1]
    if p <= 2:
        return torch.full(S.shape[:-1], p, dtype=torch.int64, device=S.device)
    s = S.double()
    span = (s[..., :1] - s[..., -1:]).clamp_min(torch.finfo(torch.float64).tiny)
    y = (s - s[..., -1:]) / span  # 1 at the first point, 0 at the last
    x = torch.linspace(0, 1, p, dtype=torch.float64, device=S.device)
    # Distance below the chord y = 1 - x (a convex decaying spectrum lies under it).
    dist = (1 - x) - y
    return dist.argmax(-1) + 1


@strict_kwargs
def select_rank(
    S: torch.Tensor,
    *,
    energy: Optional[float] = None,
    elbow: bool = False,
    max_rank: Optional[int] = None,
) -> torch.Tensor:
    """Rank to keep for each spectrum in a batch.

    Args:
        S: ``[..., p]`` finite, non-negative singular values in descending order
            (``ValueError`` naming ``S`` otherwise: a rank from a NaN or unsorted
            spectrum would be meaningless).
        energy: keep the fewest components whose squared singular values sum to at
            least this fraction (in (0, 1]) of the total.
        elbow: keep the components up to the elbow of the spectrum (the point
            farthest below the chord from the first to the last value, Kneedle).
        max_rank: upper bound on the result.

    Returns:
        ``[...]`` int64 ranks in ``[1, p]`` (``[1, max_rank]``). With both criteria
        the larger rank is kept: the energy threshold is a fidelity floor, and
        stopping before the elbow would drop components that still matter. With
        neither, ``p`` (or ``max_rank``).
    """
    if not isinstance(S, torch.Tensor) or not S.is_floating_point():
        got = S.dtype if isinstance(S, torch.Tensor) else type(S).__name__
        raise TypeError(f"S: expected a floating-point tensor [..., p], got {got}")
    if S.dim() < 1 or S.shape[-1] == 0:
        raise ValueError(f"S: expected shape [..., p] with p >= 1, got {tuple(S.shape)}")
    if energy is not None and not (not isinstance(energy, bool) and isinstance(energy, (int, float))
                                   and 0 < energy <= 1):
        raise ValueError(f"energy: expected a number in (0, 1], got {energy!r}")
    if not isinstance(elbow, bool):
        raise TypeError(f"elbow: expected a bool, got {type(elbow).__name__}")
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
        raise ValueError(f"max_rank: expected an int >= 1, got {max_rank!r}")
    if S.device.type == "meta":
        raise ValueError("S: expected a tensor with values (a rank depends on them), got a meta tensor")
    if not bool(torch.isfinite(S).all()):
        raise ValueError(f"S: expected finite singular values, got {int((~torch.isfinite(S)).sum())} NaN or inf "
                         f"entries in shape {tuple(S.shape)}")
    if bool((S < 0).any()):
        raise ValueError(f"S: expected non-negative singular values, got a negative entry (min {float(S.min()):g})")
    if S.shape[-1] > 1 and bool((S[..., 1:] > S[..., :-1]).any()):
        raise ValueError("S: expected singular values in descending order along the last dim, got an entry larger "
                         "than the one before it (ascending or unsorted)")
    p = S.shape[-1]
    rank = torch.zeros(S.shape[:-1], dtype=torch.int64, device=S.device)
    if energy is not None:
        rank = torch.maximum(rank, _energy_rank(S, float(energy)).long())
    if elbow:
        rank = torch.maximum(rank, _elbow_rank(S).long())
    if energy is None and not elbow:
        rank = torch.full_like(rank, p)
    return rank.clamp(1, p if max_rank is None else min(p, max_rank))
