"""The ``lowrank_adam_step`` op: one GaLore-style Adam step of one weight matrix.

``torch.ops.svdkernels.lowrank_adam_step`` projects a gradient on a rank-``r`` basis,
updates Adam's moments in rank space, back-projects the normalised step and applies it
and the decoupled weight decay to the weight, all in place. Schema, fake
implementation, validation and backend dispatch live here; the math in
``svdkernels/reference/lowrank_adam_step.py``; the fused kernels in
``svdkernels/triton/lowrank_adam_step.py`` (CUDA) and ``csrc/cpu/lowrank_adam_step.cpp``
(CPU, float32 and bfloat16 weights, through ``svdkernels/ops/lowrank_adam_step_cpp.py``).

The basis travels as ``P [r, k]`` float32 rows, or packed int4 ``P [r, ceil(k/2)]``
uint8 with ``P_scale, P_zero [r, ceil(k/256)]`` float32 (the layout of
:func:`quantize_basis`), ``k`` the projected side of ``W [m, n]``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from svdkernels.backends import requested_backend, select_backend, traced_triton
from svdkernels.ops import lowrank_adam_step_cpp as cpp_backend
from svdkernels.ops.registration import triton_op
from svdkernels.reference import lowrank_adam_step as reference
from svdkernels.reference.lowrank_adam_step import (  # noqa: F401  (re-exported for the layers)
    BASIS_GROUP,
    basis_groups,
    bias_corrected_step_size,
    dequantize_basis,
    quantize_basis,
    stochastic_round,
)
from svdkernels.reference.lowrank_adam_step import random_uniform as sr_uniform

__all__ = [
    "BASIS_GROUP", "basis_groups", "bias_corrected_step_size", "dequantize_basis", "lowrank_adam_step",
    "projected_adam_step", "quantize_basis", "sr_uniform", "stochastic_round", "validate",
]

_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SIDES = ("right", "left")


def _check_float(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")


def _check_tensor(name: str, t: object, W: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device != W.device:
        raise ValueError(f"{name}: expected device {W.device} (that of W), got {t.device}")
    return t


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {what} = {list(shape)}, got {list(t.shape)}")


def validate(
    W: torch.Tensor, G: torch.Tensor, P: torch.Tensor, P_scale: Optional[torch.Tensor],
    P_zero: Optional[torch.Tensor], exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, right: bool,
    beta1: float, beta2: float, eps: float, step_size: float, decay: float, sr_seed: Optional[int],
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument for any bad input."""
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"W: expected a torch.Tensor, got {type(W).__name__}")
    if W.dtype not in _WEIGHT_DTYPES:
        raise TypeError(f"W: expected dtype float32, bfloat16 or float16, got {W.dtype}")
    if W.dim() != 2:
        raise ValueError(f"W: expected a 2-D weight [m, n], got shape {list(W.shape)}")
    m, n = W.shape
    _check_tensor("G", G, W)
    if G.dtype != W.dtype:
        raise TypeError(f"G: expected dtype {W.dtype} (that of W), got {G.dtype}")
    _check_shape("G", G, (m, n), "[m, n] (that of W)")
    if not isinstance(right, bool):
        raise TypeError(f"right: expected a bool, got {type(right).__name__}")
    k = n if right else m
    _check_tensor("P", P, W)
    if P.dim() != 2:
        raise ValueError(f"P: expected a 2-D basis [r, k], got shape {list(P.shape)}")
    r = P.shape[0]
    if not 1 <= r <= min(m, n):
        raise ValueError(f"P: expected 1 <= r <= min(m, n) = {min(m, n)} basis rows, got r = {r}")
    if P.dtype == torch.uint8:
        _check_shape("P", P, (r, (k + 1) // 2), f"[r, ceil(k/2)] (packed int4, k = {k})")
        for name, t in (("P_scale", P_scale), ("P_zero", P_zero)):
            if t is None:
                raise ValueError(f"{name}: expected a float32 tensor [r, ceil(k/256)] with a packed int4 P, got None")
            _check_tensor(name, t, W)
            if t.dtype != torch.float32:
                raise TypeError(f"{name}: expected dtype torch.float32, got {t.dtype}")
            _check_shape(name, t, (r, reference.basis_groups(k)), "[r, ceil(k/256)]")
    elif P.dtype == torch.float32:
        _check_shape("P", P, (r, k), f"[r, k] (k = {'n' if right else 'm'} = {k})")
        if P_scale is not None or P_zero is not None:
            raise ValueError("P_scale, P_zero: expected None with a float32 basis P, got tensors")
    else:
        raise TypeError(f"P: expected dtype torch.float32 or torch.uint8 (packed int4), got {P.dtype}")
    moments = (m, r) if right else (r, n)
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _check_tensor(name, t, W)
        if t.dtype != torch.float32:
            raise TypeError(f"{name}: expected dtype torch.float32, got {t.dtype}")
        _check_shape(name, t, moments, "[m, r]" if right else "[r, n]")
    for name, value in (("beta1", beta1), ("beta2", beta2), ("eps", eps), ("step_size", step_size),
                        ("decay", decay)):
        _check_float(name, value)
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name}: expected 0 <= {name} < 1, got {value}")
    for name, value in (("eps", eps), ("step_size", step_size), ("decay", decay)):
        if not math.isfinite(value):  # a NaN or inf here would be written into W
            raise ValueError(f"{name}: expected a finite float, got {value}")
    if eps < 0:
        raise ValueError(f"eps: expected >= 0, got {eps}")
    if sr_seed is not None:
        if isinstance(sr_seed, bool) or not isinstance(sr_seed, int):
            raise TypeError(f"sr_seed: expected an int or None, got {type(sr_seed).__name__}")
        if not W.is_contiguous():
            raise ValueError("W: expected a contiguous weight with sr_seed (the rounding is keyed by the flat index)")


def _triton_step(*args: object) -> None:
    from svdkernels.triton import lowrank_adam_step as triton_step  # on first use: never at import

    triton_step.lowrank_adam_step(*args)


def projected_adam_step(
    W: torch.Tensor, R: torch.Tensor, Pf: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
    right: bool, beta1: float, beta2: float, eps: float, step_size: float, decay: float, sr_seed: Optional[int],
) -> None:
    """The step after the projection, for gradients accumulated in rank space
    (:mod:`svdkernels.train.projected_step`): ``R`` float32 ``[m, r]`` (right) or
    ``[r, n]`` (left), ``Pf [r, k]`` the float32 basis; the rest as :func:`lowrank_adam_step`.
    The C++ kernel where it takes the call (the same code as the fused step's after its
    projection, so both give the same bits from the same ``R``), else the reference."""
    if (select_backend("lowrank_adam_step", W.device, has_cpp=True) == "cpp"
            and cpp_backend.cpp_supports(W, exp_avg, exp_avg_sq) and Pf.dtype == torch.float32):
        cpp_backend.projected_adam_step(W, R.float(), Pf, exp_avg, exp_avg_sq, right, beta1, beta2, eps, step_size,
                                        decay, sr_seed)
    else:
        reference.projected_adam_step(W, R, Pf, exp_avg, exp_avg_sq, right, beta1, beta2, eps, step_size, decay,
                                      sr_seed)


@torch.library.custom_op("svdkernels::_lowrank_adam_step_dispatch", mutates_args=("W", "exp_avg", "exp_avg_sq"))
def _lowrank_adam_step_dispatch_op(
    W: torch.Tensor, G: torch.Tensor, P: torch.Tensor, P_scale: Optional[torch.Tensor],
    P_zero: Optional[torch.Tensor], exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, right: bool,
    beta1: float, beta2: float, eps: float, step_size: float, decay: float, sr_seed: Optional[int],
) -> None:
    """Opaque to tracing: every backend of ``lowrank_adam_step`` (inputs validated)."""
    args = (W, G, P, P_scale, P_zero, exp_avg, exp_avg_sq, right, beta1, beta2, eps, step_size, decay, sr_seed)
    backend = select_backend("lowrank_adam_step", W.device, has_cpp=True)
    if backend == "cpp" and not cpp_backend.cpp_supports(W, exp_avg, exp_avg_sq):
        if requested_backend() == "cpp":
            raise RuntimeError("lowrank_adam_step: the cpp backend takes contiguous float32 or bfloat16 CPU weights "
                               f"and moments, got a {W.device.type} {W.dtype} W (contiguous: W {W.is_contiguous()}, "
                               f"exp_avg {exp_avg.is_contiguous()}, exp_avg_sq {exp_avg_sq.is_contiguous()})")
        backend = "reference"
    if backend == "triton":
        _triton_step(*args)
    elif backend == "cpp":
        cpp_backend.lowrank_adam_step(*args)
    else:
        reference.lowrank_adam_step(*args)


@_lowrank_adam_step_dispatch_op.register_fake
def _(W, G, P, P_scale, P_zero, exp_avg, exp_avg_sq, right, beta1, beta2, eps, step_size, decay, sr_seed):
    validate(W, G, P, P_scale, P_zero, exp_avg, exp_avg_sq, right, beta1, beta2, eps, step_size, decay, sr_seed)


@triton_op("svdkernels::lowrank_adam_step", mutates_args=("W", "exp_avg", "exp_avg_sq"))
def lowrank_adam_step_op(
    W: torch.Tensor, G: torch.Tensor, P: torch.Tensor, P_scale: Optional[torch.Tensor],
    P_zero: Optional[torch.Tensor], exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, right: bool,
    beta1: float, beta2: float, eps: float, step_size: float, decay: float, sr_seed: Optional[int],
) -> None:
    """``torch.ops.svdkernels.lowrank_adam_step``; see :func:`lowrank_adam_step`.

    A ``triton_op``: where the call runs compiled Triton kernels, torch.compile traces
    their launches (a compiled training step sees them); every other backend is the
    opaque ``_lowrank_adam_step_dispatch``."""
    args = (W, G, P, P_scale, P_zero, exp_avg, exp_avg_sq, right, beta1, beta2, eps, step_size, decay, sr_seed)
    validate(*args)
    if traced_triton("lowrank_adam_step", W.device, has_cpp=True):
        _triton_step(*args)
    else:
        torch.ops.svdkernels._lowrank_adam_step_dispatch(*args)


def lowrank_adam_step(
    W: torch.Tensor,
    G: torch.Tensor,
    P: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step_size: float,
    side: str = "right",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    decay: float = 0.0,
    P_scale: Optional[torch.Tensor] = None,
    P_zero: Optional[torch.Tensor] = None,
    sr_seed: Optional[int] = None,
) -> None:
    """One low-rank Adam step of ``W`` in place (GaLore, Zhao et al. 2024).

    ``R`` = the gradient projected on the basis, Adam in rank space, the normalised
    step back-projected and applied with the decoupled weight decay::

        right: R = G·Pᵀ [m, r]      left: R = P·G [r, n]
        m ← β1·m + (1−β1)·R;  v ← β2·v + (1−β2)·R²;  N = m / (√v + eps)
        W ← W − step_size·(N·P  or  Pᵀ·N);  W ← W − decay·W

    Args:
        W: ``[m, n]`` float32, bfloat16 or float16, updated in place.
        G: ``[m, n]``, W's dtype.
        P: the basis rows ``[r, k]`` float32 (``k = n`` right, ``m`` left), or packed
            int4 ``[r, ceil(k/2)]`` uint8 with ``P_scale``/``P_zero`` (Q-GaLore; see
            :func:`quantize_basis`), dequantised inside the step.
        exp_avg, exp_avg_sq: float32 ``[m, r]`` (right) or ``[r, n]`` (left), in place.
        step_size: ``lr·√(1−β2ᵗ)/(1−β1ᵗ)·scale`` (:func:`bias_corrected_step_size`
            times GaLore's scale).
        side: ``"right"`` or ``"left"``.
        decay: ``lr·weight_decay``.
        sr_seed: round a bfloat16 ``W`` stochastically, keyed by ``(sr_seed, flat
            index)`` (deterministic); ``None`` rounds to nearest.

    On CUDA one kernel projects and updates the moments (writing only the rank-size
    ``N``) and a second back-projects tile by tile into ``W``: the only full-size
    memory traffic is reading ``G`` and reading and writing ``W`` once. On the CPU
    (float32 and bfloat16 weights, the C++ extension built) the projection is a GEMM
    and one register-tiled pass back-projects into ``W`` with no full-size temporary.

    Example::

        W, G = torch.randn(512, 256), torch.randn(512, 256)
        P = torch.linalg.svd(G, full_matrices=False)[2][:16]       # [16, 256]
        m, v = torch.zeros(512, 16), torch.zeros(512, 16)
        svdkernels.lowrank_adam_step(W, G, P, m, v, step_size=1e-3)
    """
    if side not in SIDES:
        raise ValueError(f"side: expected one of {SIDES}, got {side!r}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas: expected a pair of floats, got {betas!r}")
    for i, beta in enumerate(betas):  # named as the caller wrote them, before validate's beta1/beta2
        _check_float(f"betas[{i}]", beta)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"betas[{i}]: expected 0 <= betas[{i}] < 1, got {beta}")
    beta1, beta2 = betas
    args = (W, G, P, P_scale, P_zero, exp_avg, exp_avg_sq, side == "right", beta1, beta2, eps,
            step_size, decay, sr_seed)
    validate(*args)
    torch.ops.svdkernels.lowrank_adam_step(W, G, P, P_scale, P_zero, exp_avg, exp_avg_sq, side == "right",
                                           float(beta1), float(beta2), float(eps), float(step_size),
                                           float(decay), sr_seed)
