"""Rank allocation: how many singular triplets each factorisation keeps.

A *unit* is one factorisation: a layer, or a group of layers sharing a basis. It
stores ``rank·per_rank`` parameters at a given rank, ``dense`` when left as it was.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["Unit", "allocate_global", "allocate_uniform"]


@dataclass
class Unit:
    """One factorisation: ``names`` of its layers, ``per_rank`` parameters per kept
    triplet (``n + G·m``), ``dense`` its dense parameter count (``G·m·n``), ``k`` its
    largest rank and ``lam`` ``[k]`` its squared weighted singular values (descending).
    ``weight``: what the unit's whole spectrum is worth in the global objective
    (dropping triplet ``i`` costs ``weight·lamᵢ/Σlam``)."""

    names: list[str]
    per_rank: int
    dense: int
    k: int
    lam: Optional[torch.Tensor] = None
    weight: float = 1.0

    @property
    def max_rank(self) -> int:
        """The largest rank that stores fewer parameters than the dense weights."""
        return min(self.k, math.ceil(self.dense / self.per_rank) - 1)


def allocate_uniform(units: list[Unit], keep: float) -> list[Optional[int]]:
    """Every unit at the same ratio: ``rank = ⌊keep·dense/per_rank⌋`` (None = left
    dense, only at ``keep = 1``). ``ValueError`` naming the layer and ``keep`` when a
    rank would be 0."""
    ranks: list[Optional[int]] = []
    for u in units:
        if keep >= 1:
            ranks.append(None)
            continue
        r = min(int(keep * u.dense // u.per_rank), u.max_rank)
        if r < 1:
            raise ValueError(f"keep: {keep} leaves layer {u.names[0]!r} less than rank 1 ({u.per_rank} parameters "
                             f"per rank, {u.dense} dense); expected keep >= {u.per_rank / u.dense:.4g}")
        ranks.append(r)
    return ranks


def allocate_global(units: list[Unit], keep: float) -> list[Optional[int]]:
    """Ranks minimising ``Σ_units weight·(Σ_{i>r} lamᵢ)/(Σ lam)`` within
    ``⌊keep·Σ dense⌋`` parameters, greedily: every unit starts at rank 1, then the
    step with the largest error removed per parameter is taken while it fits. A unit
    at its :attr:`Unit.max_rank` can take one more step, back to dense (zero error,
    ``dense − max_rank·per_rank`` more parameters). With ``σᵢ²`` descending the
    rank steps of a unit have decreasing gains at equal cost, so the greedy choice is
    optimal up to the last, partly-fitting step.

    :func:`svdkernels.compress.compress_model` sets ``weight`` so that the objective
    is the predicted change of the model's output (module docstring there).

    Raises ``ValueError`` naming ``keep`` when rank 1 everywhere does not fit.
    """
    budget = int(keep * sum(u.dense for u in units))
    floor = sum(u.per_rank for u in units)
    if floor > budget:
        raise ValueError(f"keep: {keep} gives {budget} parameters, fewer than rank 1 in every layer needs "
                         f"({floor}); expected keep >= {floor / sum(u.dense for u in units):.4g}")
    left = budget - floor
    ranks: list[Optional[int]] = [1] * len(units)
    lams = []
    for u in units:
        lam = u.lam.double().cpu()
        total = float(lam.sum())
        lams.append((lam * (u.weight / total)) if total > 0 else torch.zeros_like(lam))
    tails = [torch.cat([lam.flip(0).cumsum(0).flip(0), lam.new_zeros(1)]) for lam in lams]

    def step(i: int, r: int) -> Optional[tuple[float, int, int, int]]:
        u = units[i]
        if r >= u.max_rank:
            if r > u.max_rank or u.dense - r * u.per_rank <= 0:
                return None
            cost = u.dense - r * u.per_rank
            gain = float(tails[i][r])  # everything not yet kept
            return (-gain / cost, i, r, cost)
        return (-float(lams[i][r]) / u.per_rank, i, r, u.per_rank)

    heap = [s for i in range(len(units)) if (s := step(i, 1)) is not None]
    heapq.heapify(heap)
    while heap:
        _, i, r, cost = heapq.heappop(heap)
        if cost > left:
            continue  # this unit's next step no longer fits; others' may
        left -= cost
        if r >= units[i].max_rank:
            ranks[i] = None  # back to dense
            continue
        ranks[i] = r + 1
        nxt = step(i, r + 1)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    return ranks
