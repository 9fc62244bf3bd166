"""The low-rank Adam step from an already projected gradient (rank-space accumulation).

GaLore (Zhao et al. 2024) projects each gradient ``G [m, n]`` on a rank-``r`` basis
``P [r, k]`` before Adam sees it. Projection is linear, so the sum of ``k`` micro-batch
gradients can be accumulated in rank space: ``Σ Gᵢ·Pᵀ = (Σ Gᵢ)·Pᵀ``, exactly in real
arithmetic. :func:`svdkernels.train.layerwise` does this so that no full-size gradient
outlives its post-accumulate-grad hook. This module is its step: the same math as
:func:`svdkernels.ops.lowrank_adam_step.lowrank_adam_step` (reference backend), starting
from ``R`` instead of ``G``.
"""
from __future__ import annotations

from typing import Optional

import torch

from svdkernels.ops import lowrank_adam_step as step_op


def project_gradient(G: torch.Tensor, P: torch.Tensor, right: bool) -> torch.Tensor:
    """``R = G·Pᵀ [m, r]`` (right) or ``P·G [r, n]`` (left), float32.

    ``G [m, n]`` any float dtype (computed in float32, as the fused step does);
    ``P [r, k]`` float32 basis rows (an int4 basis dequantised by the caller).
    """
    g = G.float()
    return g @ P.T if right else P @ g


def projected_adam_step(
    W: torch.Tensor,
    R: torch.Tensor,
    P: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    right: bool,
    betas: tuple[float, float],
    eps: float,
    step_size: float,
    decay: float,
    sr_seed: Optional[int] = None,
) -> None:
    """One low-rank Adam step of ``W`` in place, from the projected gradient ``R``.

    Shapes: ``W [m, n]`` float32/bfloat16/float16; ``R`` and the float32 moments
    ``[m, r]`` (right) or ``[r, n]`` (left); ``P [r, k]`` float32 rows. ``step_size`` and
    ``decay`` as the fused op's (``lr·√(1−β2ᵗ)/(1−β1ᵗ)·scale`` and ``lr·weight_decay``)::

        m ← β1·m + (1−β1)·R;  v ← β2·v + (1−β2)·R²;  N = m / (√v + eps)
        W ← W − step_size·(N·P or Pᵀ·N);  W ← W − decay·W

    A bfloat16 ``W`` is rounded once, stochastically with ``sr_seed``.
    """
    beta1, beta2 = betas
    step_op.projected_adam_step(W, R, P, exp_avg, exp_avg_sq, right, beta1, beta2, eps, step_size, decay, sr_seed)
