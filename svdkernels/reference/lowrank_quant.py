"""Low-rank + 4-bit linear layers in plain PyTorch: the reference backend.

SVDQuant (Li et al. 2024) keeps a linear weight as ``W ≈ L_up·L_down + R``: a
16-bit low-rank branch of rank ``r`` that absorbs the weight's largest components
(and, after smoothing, the activations' outliers), and a residual ``R`` stored in
int4 (formats in ``svdkernels/formats/int4.py``). With smoothing factors ``λ``
(per input channel) folded in, a layer computes::

    y = Q(x/λ)·Q(R)ᵀ + (x·L_downᵀ)·L_upᵀ + bias        (L_down already holds 1/λ)

- W4A16 (``lowrank_w4a16_linear``): the activations stay 16-bit,
  ``y = x·deq(qweight)ᵀ + (x·L_downᵀ)·L_upᵀ + bias``.
- W4A4: ``lowrank_quantize_act`` quantises ``x/λ`` per token and group and computes
  the down projection ``x·L_downᵀ`` of the unsmoothed ``x``; ``lowrank_w4a4_gemm``
  multiplies the int4 operands group by group (exact integer sums), rescales each
  group's sum by ``xscale·scale`` in float32 and adds the up projection and bias.

Everything accumulates in float32 (on the CPU, ``torch.matmul`` of float32 does).
This module is the test oracle of the C++ and Triton backends; it validates
nothing (``svdkernels/ops/lowrank_quant.py`` does).
"""
from __future__ import annotations

from typing import Optional

import torch

from svdkernels.formats.int4 import GROUP_SIZE, dequantize_weight, quantize_act, unpack_int4


def lowrank_branch(x: torch.Tensor, L_down: torch.Tensor, L_up: torch.Tensor) -> torch.Tensor:
    """``(x·L_downᵀ)·L_upᵀ`` in float32: ``x [M, K]``, ``L_down [r, K]``, ``L_up [N, r]`` -> ``[M, N]``."""
    return (x.float() @ L_down.float().T) @ L_up.float().T


def _add_bias(y: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return y if bias is None else y + bias.float()


def lowrank_w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    L_down: torch.Tensor,
    L_up: torch.Tensor,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """``y [..., N] = x·deq(qweight)ᵀ + (x·L_downᵀ)·L_upᵀ + bias`` in ``x.dtype``.

    ``x [..., K]``, ``qweight [N, K/2]`` uint8, ``scales [N, K/64]``, ``L_down [r, K]``,
    ``L_up [N, r]``, ``bias [N]`` or ``None``. The weight is dequantised to float32
    (``q·s``), every product accumulates in float32, and the sum is rounded once.
    """
    x2 = x.reshape(-1, x.shape[-1]).float()
    W = dequantize_weight(qweight, scales, dtype=torch.float32)  # [N, K]
    y = _add_bias(x2 @ W.T + lowrank_branch(x2, L_down, L_up), bias)
    return y.to(x.dtype).reshape(*x.shape[:-1], W.shape[0])


def lowrank_quantize_act(
    x: torch.Tensor, smooth: torch.Tensor, L_down: torch.Tensor, unsigned: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise ``x/λ`` and compute the low-rank down projection of ``x``.

    Returns ``xq [..., K/2]`` uint8 and ``xscale [..., K/64]`` float32 of
    ``x/smooth`` (``(x + 0.171875)/smooth`` if ``unsigned``), exactly
    :func:`svdkernels.quant.quantize_act`, and ``lowrank_act [..., r] = x·L_downᵀ``
    in float32 (the down projection reads the unsmoothed ``x``: SVDQuant folds
    ``1/λ`` into ``L_down``).
    """
    xq, xscale = quantize_act(x, unsigned=unsigned, smooth=smooth)
    lowrank_act = x.float() @ L_down.float().T
    return xq, xscale, lowrank_act


def lowrank_w4a4_gemm(
    xq: torch.Tensor,
    xscale: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    lowrank_act: torch.Tensor,
    L_up: torch.Tensor,
    bias: Optional[torch.Tensor],
    unsigned: bool,
) -> torch.Tensor:
    """``y [..., N] = Σ_g (Σ_{k∈g} qx_k·qw_k)·xscale_g·scale_g + lowrank_act·L_upᵀ + bias``.

    ``xq [..., K/2]`` uint8 with ``xscale [..., K/64]`` float32 (unsigned nibbles if
    ``unsigned``), ``qweight [N, K/2]`` with ``scales [N, K/64]``, ``lowrank_act
    [..., r]`` float32, ``L_up [N, r]``, ``bias [N]`` or ``None``; ``y`` in
    ``scales.dtype``. Each group's integer sum is exact (at most 64·8·15 in
    magnitude, so float32 holds it exactly); the rescale and the sum over groups
    are float32.
    """
    lead = xq.shape[:-1]
    G = scales.shape[1]
    qx = unpack_int4(xq.reshape(-1, xq.shape[-1]), signed=not unsigned).float()
    qx = qx.unflatten(-1, (G, GROUP_SIZE))  # [M, G, 64]
    qw = unpack_int4(qweight).float().unflatten(-1, (G, GROUP_SIZE))  # [N, G, 64]
    xs = xscale.reshape(-1, G)  # [M, G]
    ws = scales.float()  # [N, G]
    y = torch.zeros(qx.shape[0], qw.shape[0], dtype=torch.float32, device=qx.device)
    for g in range(G):
        group_sum = qx[:, g] @ qw[:, g].T  # [M, N], integers
        y += group_sum * (xs[:, g, None] * ws[None, :, g])
    y = _add_bias(y + lowrank_act.reshape(qx.shape[0], lowrank_act.shape[-1]).float() @ L_up.float().T, bias)
    return y.to(scales.dtype).reshape(*lead, qw.shape[0])


def lowrank_w4a4_linear(
    x: torch.Tensor,
    smooth: torch.Tensor,
    L_down: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    L_up: torch.Tensor,
    bias: Optional[torch.Tensor],
    unsigned: bool,
) -> torch.Tensor:
    """SVDQuant W4A4 layer, ``y [..., N]`` in ``x.dtype``: :func:`lowrank_quantize_act`
    of ``x [..., K]`` then :func:`lowrank_w4a4_gemm` (``scales``, ``L_up`` and ``bias``
    in the dtype of ``x``)."""
    xq, xscale, lowrank_act = lowrank_quantize_act(x, smooth, L_down, unsigned)
    return lowrank_w4a4_gemm(xq, xscale, qweight, scales, lowrank_act, L_up, bias, unsigned)
