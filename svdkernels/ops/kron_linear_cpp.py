"""The C++ backend of ``kron_linear`` and its backward (``csrc/cpu/kron_linear.cpp``).

The forward pass and the fused backward (one pass over ``grad_y`` and ``x`` giving
``∂x``, ``∂A`` and ``∂B``; internal ops ``torch.ops.svdkernels._cpp_kron_linear`` and
``_cpp_kron_linear_backward``) take float32 CPU tensors and dense factors; a
low-rank factor ``[u, v]`` is composed first (``u @ v``, the size of the dense
factor) and its gradients chained back as the reference does.

A low-rank ``B = [Bu, Bv]`` (peft LoKr's ``w2_a·w2_b``) whose rank makes it cheaper
instead runs ``_cpp_kron_linear_lowrank_b`` / ``_cpp_kron_linear_lowrank_b_backward``,
which take every product through the rank and return ``∂Bu``, ``∂Bv`` directly
(:func:`use_lowrank_b`). Other dtypes run the reference.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from svdkernels.reference import kron_linear as reference

CPP_DTYPES = (torch.float32,)
"""Dtypes the C++ kernels take."""


def cpp_supports(x: torch.Tensor) -> bool:
    """Whether the C++ kernels can run this call (a float32 CPU tensor)."""
    return x.device.type == "cpu" and x.dtype in CPP_DTYPES


def _ops():
    import svdkernels._C  # noqa: F401 - registers the internal ops

    return torch.ops.svdkernels


def use_lowrank_b(A: Sequence[torch.Tensor], B: Sequence[torch.Tensor]) -> bool:
    """Whether ``B = [Bu [r, b1, k], Bv [r, k, b2]]`` goes through the rank-``k`` kernels:
    when their multiply-adds per token, ``k·(a2·b2 + a1·a2 + a1·b1)``, undercut the
    dense forward's ``b1·(a2·b2 + a1·a2)`` (the backward's ratio is about the same)."""
    if len(B) != 2:
        return False
    _, a1, a2 = reference.factor_dims(A)
    _, b1, k = B[0].shape
    b2 = B[1].shape[2]
    return k * (a2 * b2 + a1 * a2 + a1 * b1) < b1 * (a2 * b2 + a1 * a2)


def forward(x2: torch.Tensor, A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], scale: float, *,
            isa: int = -1) -> torch.Tensor:
    """``y [N, a1·b1] = scale · x2 [N, a2·b2] @ (Σ_i A_i ⊗ B_i)ᵀ`` (factor lists as the op's).
    ``isa``: -1 the best this CPU runs, 0 portable C++, 1 AVX2, 2 AVX-512."""
    Bm, Bv = _b_args(A, B)
    if Bv is not None:
        return _ops()._cpp_kron_linear_lowrank_b(x2, reference.compose(A), Bm, Bv, scale, isa)
    return _ops()._cpp_kron_linear(x2, reference.compose(A), Bm, scale, isa)


def backward(
    g2: torch.Tensor, x2: torch.Tensor, A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], scale: float,
    needs: tuple[bool, bool, bool], *, isa: int = -1,
) -> tuple[torch.Tensor | None, list[torch.Tensor] | None, list[torch.Tensor] | None]:
    """``(∂x, [∂A factors], [∂B factors])`` as :func:`svdkernels.reference.kron_linear.backward`."""
    if use_lowrank_b(A, B):
        gx, gA, gBu, gBv = _ops()._cpp_kron_linear_lowrank_b_backward(
            g2, x2, reference.compose(A), B[0], B[1], scale, needs[0], needs[1], needs[2], isa)
        return (gx if needs[0] else None, reference.chain(A, gA) if needs[1] else None,
                [gBu, gBv] if needs[2] else None)
    gx, gA, gB = _ops()._cpp_kron_linear_backward(
        g2, x2, reference.compose(A), reference.compose(B), scale, needs[0], needs[1], needs[2], isa)
    return (gx if needs[0] else None, reference.chain(A, gA) if needs[1] else None,
            reference.chain(B, gB) if needs[2] else None)


def _b_args(A: Sequence[torch.Tensor], B: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(B, None)`` dense, or ``(Bu, Bv)`` where :func:`use_lowrank_b`."""
    return (B[0], B[1]) if use_lowrank_b(A, B) else (reference.compose(B), None)


def add_(y: torch.Tensor, x2: torch.Tensor, A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], scale: float, *,
         isa: int = -1) -> None:
    """``y [N, a1·b1] += scale · x2 @ (Σ_i A_i ⊗ B_i)ᵀ`` in place (``y`` contiguous float32)."""
    _ops()._cpp_kron_linear_add_(y, x2, reference.compose(A), *_b_args(A, B), scale, isa)


def backward_add_(
    gx: torch.Tensor, g2: torch.Tensor, x2: torch.Tensor, A: Sequence[torch.Tensor], B: Sequence[torch.Tensor],
    scale: float, needs_A: bool, needs_B: bool, *, isa: int = -1,
) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
    """``gx [N, a2·b2] += ∂x`` in place; returns ``([∂A factors], [∂B factors])`` (``None``
    where not asked for) as :func:`backward`."""
    Bm, Bv = _b_args(A, B)
    gA, gB, gBv = _ops()._cpp_kron_linear_backward_add_(gx, g2, x2, reference.compose(A), Bm, Bv, scale, needs_A,
                                                         needs_B, isa)
    gB_list = ([gB, gBv] if Bv is not None else reference.chain(B, gB)) if needs_B else None
    return (reference.chain(A, gA) if needs_A else None), gB_list
