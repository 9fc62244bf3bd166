"""Reference backend of ``lowrank_adam_step``: one GaLore-style Adam step of one matrix.

GaLore (Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection") keeps Adam's moments in a rank-``r`` projection of the gradient. With the
basis stored as rows ``P [r, k]`` (orthonormal rows for the SVD/DCT projectors), a
weight ``W [m, n]`` and its gradient ``G [m, n]``:

- right side (``k = n``, GaLore's choice when ``m >= n``): ``R = G·Pᵀ [m, r]``, update
  ``U = N·P [m, n]``;
- left side (``k = m``): ``R = P·G [r, n]``, update ``U = Pᵀ·N [m, n]``;

and, in rank space, the Adam moments and the normalised step (Hugging Face / GaLore
form: ``eps`` added to the uncorrected ``√v``, the bias correction folded into the
step size by the caller)::

    m ← β1·m + (1−β1)·R
    v ← β2·v + (1−β2)·R²
    N = m / (√v + eps)
    W ← W − step_size·U          (step_size = lr·√(1−β2ᵗ)/(1−β1ᵗ)·scale)
    W ← W − decay·W              (decay = lr·weight_decay, after the update as GaLore)

Everything is computed in float32; ``W`` may be float32, bfloat16 or float16 and is
rounded once at the end (to nearest, or stochastically with ``sr_seed``, see
:func:`stochastic_round`). The moments are float32.

The basis may also be stored as packed int4 (Q-GaLore, Zhang et al. 2024, "Q-GaLore:
Quantized GaLore with INT4 Projection and Layer-Adaptive Low-Rank Gradients"):
:func:`quantize_basis` / :func:`dequantize_basis` define that layout.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

BASIS_GROUP = 256
"""Int4 basis: one (scale, minimum) pair per group of 256 consecutive entries of a basis row."""

# ---------------------------------------------------------------------------
# The packed int4 basis
#
# A basis ``P [..., r, k]`` is quantised per row in groups of BASIS_GROUP consecutive
# entries (the last group of a row may be shorter), asymmetric min/max as Q-GaLore:
#     scale = (max − min) / 15,  q = round((P − min) / scale) ∈ [0, 15],  P ≈ q·scale + min
# and packed two per byte along k, even k in the low nibble (the nibble order of
# svdkernels.formats.int4): packed [..., r, ceil(k/2)] uint8, scale and zero (the
# minimum) [..., r, ceil(k/256)] float32. 4.25 bits per entry: 1/7.5 of float32.


def basis_groups(k: int) -> int:
    """Number of quantisation groups along a basis row of length ``k``."""
    return -(-k // BASIS_GROUP)


def quantize_basis(P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``P [..., r, k]`` → ``(packed [..., r, ceil(k/2)] uint8, scale, zero [..., r, ceil(k/256)] f32)``.

    Round to nearest; a constant group has ``scale = 0`` and dequantises exactly to its
    value. No host synchronisation (safe inside a training step).
    """
    k = P.shape[-1]
    g = basis_groups(k)
    pad = g * BASIS_GROUP - k
    x = P.float()
    # Padding never widens a group's range: +inf for the minimum, -inf for the maximum.
    lo = torch.nn.functional.pad(x, (0, pad), value=math.inf).unflatten(-1, (g, BASIS_GROUP)).amin(-1)
    hi = torch.nn.functional.pad(x, (0, pad), value=-math.inf).unflatten(-1, (g, BASIS_GROUP)).amax(-1)
    scale = (hi - lo) / 15
    group = torch.arange(k, device=P.device) // BASIS_GROUP
    s, z = scale[..., group], lo[..., group]
    q = torch.where(s > 0, torch.round((x - z) / torch.where(s > 0, s, 1.0)), 0.0).clamp_(0, 15).to(torch.int16)
    if k % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8)
    return packed.contiguous(), scale.contiguous(), lo.contiguous()


def dequantize_basis(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, k: int) -> torch.Tensor:
    """The float32 basis ``[..., r, k]`` that :func:`quantize_basis` stored."""
    b = packed.to(torch.int16)
    q = torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)[..., :k].float()
    group = torch.arange(k, device=packed.device) // BASIS_GROUP
    return q * scale[..., group] + zero[..., group]


# ---------------------------------------------------------------------------
# Stochastic rounding to bfloat16 (deterministic: a hash of (seed, index))


def _mulmod32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x·c mod 2³²`` for int64 ``x`` in [0, 2³²) without int64 overflow (16-bit halves)."""
    lo = (x & 0xFFFF) * c
    hi = (((x >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """The "lowbias32" integer hash (C. Wellons) of int64 values in [0, 2³²), int64 out.

    The Triton kernel computes the same bits with wrapping uint32 arithmetic.
    """
    x = x ^ (x >> 16)
    x = _mulmod32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mulmod32(x, 0x846CA68B)
    return x ^ (x >> 16)


def sr_key(seed: int) -> int:
    """The 31-bit key of a stochastic-rounding seed (see :func:`random_bits16`)."""
    return int(_hash32(torch.tensor(seed & 0xFFFFFFFF, dtype=torch.int64))) & 0x7FFFFFFF


def random_bits16(seed: int, numel: int, device: torch.device) -> torch.Tensor:
    """16 random bits per element index ``i`` (int64 ``[numel]``): ``hash32(i ⊕ key) & 0xFFFF``
    with ``key = hash32(seed mod 2³²) mod 2³¹`` (31 bits: it travels to the kernel as an i32).

    A pure function of ``(seed, i)``, so every backend, every run and a resumed run
    round the same element the same way.
    """
    key = sr_key(seed)
    idx = torch.arange(numel, device=device, dtype=torch.int64) & 0xFFFFFFFF
    return _hash32(idx ^ key) & 0xFFFF


def random_uniform(seed: int, numel: int, device: torch.device) -> torch.Tensor:
    """Uniform float32 ``[numel]`` in [0, 1) with 24 random bits each, from the same hash
    of ``(seed, index)`` (deterministic; for stochastic rounding to integer grids)."""
    idx = torch.arange(numel, device=device, dtype=torch.int64) & 0xFFFFFFFF
    return (_hash32(idx ^ sr_key(seed)) >> 8).float() * 2.0**-24


def stochastic_round(x: torch.Tensor, seed: int) -> torch.Tensor:
    """float32 ``x`` rounded to bfloat16 stochastically: up with probability equal to the
    distance from the value below, in units of the bfloat16 spacing (unbiased).

    Adds 16 random bits to the float32 bit pattern and truncates them (Gupta et al. 2015);
    ``x`` must be contiguous (the element index is its flat position).
    """
    bits = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rnd = random_bits16(seed, x.numel(), x.device).view(x.shape)
    # Non-finite values keep their bits (a carry could turn a NaN payload into inf).
    finite = torch.isfinite(x)
    out = torch.where(finite, (bits + rnd) & 0xFFFF0000, bits & 0xFFFF0000)
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32).view(torch.float32)
    return out.to(torch.bfloat16)  # exact: the low 16 bits are zero


def round_to(x: torch.Tensor, dtype: torch.dtype, sr_seed: Optional[int]) -> torch.Tensor:
    """float32 ``x`` as ``dtype``: stochastically for bfloat16 with a seed, else to nearest."""
    if sr_seed is not None and dtype == torch.bfloat16:
        return stochastic_round(x, sr_seed)
    return x.to(dtype)


# ---------------------------------------------------------------------------
# The step


def basis_float(P: torch.Tensor, P_scale: Optional[torch.Tensor], P_zero: Optional[torch.Tensor], k: int) -> torch.Tensor:
    """The float32 basis ``[r, k]`` from a float basis or a packed one."""
    if P.dtype == torch.uint8:
        return dequantize_basis(P, P_scale, P_zero, k)
    return P.float()


def lowrank_adam_step(
    W: torch.Tensor,
    G: torch.Tensor,
    P: torch.Tensor,
    P_scale: Optional[torch.Tensor],
    P_zero: Optional[torch.Tensor],
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    right: bool,
    beta1: float,
    beta2: float,
    eps: float,
    step_size: float,
    decay: float,
    sr_seed: Optional[int],
) -> None:
    """One step, in place on ``W``, ``exp_avg`` and ``exp_avg_sq`` (the module docstring's math).

    Shapes: ``W, G [m, n]``; ``P [r, k]`` (float) or packed ``[r, ceil(k/2)]`` uint8 with
    ``P_scale, P_zero [r, ceil(k/256)]``; moments ``[m, r]`` (right) or ``[r, n]`` (left).
    """
    k = W.shape[1] if right else W.shape[0]
    Pf = basis_float(P, P_scale, P_zero, k)
    g = G.float()
    R = g @ Pf.T if right else Pf @ g
    projected_adam_step(W, R, Pf, exp_avg, exp_avg_sq, right, beta1, beta2, eps, step_size, decay, sr_seed)


def projected_adam_step(
    W: torch.Tensor,
    R: torch.Tensor,
    Pf: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    right: bool,
    beta1: float,
    beta2: float,
    eps: float,
    step_size: float,
    decay: float,
    sr_seed: Optional[int],
) -> None:
    """The step after the projection: ``R`` is the float32 projected gradient ``[m, r]``
    (right) or ``[r, n]`` (left), ``Pf [r, k]`` the float32 basis. Shared with the
    trainer's rank-space accumulation (:mod:`svdkernels.train.projected_step`)."""
    exp_avg.mul_(beta1).add_(R, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(R, R, value=1.0 - beta2)
    N = exp_avg / (exp_avg_sq.sqrt() + eps)
    if W.dtype == torch.float32:
        # In place: the back-projection is the GEMM's accumulate step, no [m, n] temporary.
        if right:
            W.addmm_(N, Pf, alpha=-step_size)
        else:
            W.addmm_(Pf.T, N, alpha=-step_size)
        if decay != 0.0:
            W.add_(W, alpha=-decay)
        return
    U = N @ Pf if right else Pf.T @ N
    w = W.float() - step_size * U
    if decay != 0.0:
        w = w - decay * w
    W.copy_(round_to(w, W.dtype, sr_seed))


def adam_step(
    W: torch.Tensor, G: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
    beta1: float, beta2: float, eps: float, step_size: float, decay: float, sr_seed: Optional[int],
) -> None:
    """The full-rank step of the same form (for the parameters that are not projected)."""
    g = G.float()
    exp_avg.mul_(beta1).add_(g, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    w = W.float() - step_size * (exp_avg / (exp_avg_sq.sqrt() + eps))
    if decay != 0.0:
        w = w - decay * w
    W.copy_(round_to(w, W.dtype, sr_seed))


def bias_corrected_step_size(lr: float, beta1: float, beta2: float, step: int) -> float:
    """``lr·√(1−β2ᵗ)/(1−β1ᵗ)`` for step ``t >= 1`` (GaLore's and Hugging Face's AdamW)."""
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
