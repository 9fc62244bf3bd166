"""The C++ backend of ``kron_linear`` and its backward (``csrc/cpu/kron_linear.cpp``).

The forward pass and the fused backward (one pass over ``grad_y`` and ``x`` giving
``∂x``, ``∂A`` and ``∂B``; internal ops ``torch.ops.svdkernels._cpp_kron_linear`` and
``_cpp_kron_linear_backward``) take float32 CPU tensors and dense factors; a
low-rank factor ``[u, v]`` is composed first (``u @ v``, the size of the dense
factor) and its gradients chained back as the reference does. Other dtypes run
the reference.
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


def forward(x2: torch.Tensor, A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], scale: float, *,
            isa: int = -1) -> torch.Tensor:
    """``y [N, a1·b1] = scale · x2 [N, a2·b2] @ (Σ_i A_i ⊗ B_i)ᵀ`` (factor lists as the op's).
    ``isa``: -1 the best this CPU runs, 0 portable C++, 1 AVX2, 2 AVX-512."""
    return _ops()._cpp_kron_linear(x2, reference.compose(A), reference.compose(B), scale, isa)


def backward(
    g2: torch.Tensor, x2: torch.Tensor, A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], scale: float,
    needs: tuple[bool, bool, bool], *, isa: int = -1,
) -> tuple[torch.Tensor | None, list[torch.Tensor] | None, list[torch.Tensor] | None]:
    """``(∂x, [∂A factors], [∂B factors])`` as :func:`svdkernels.reference.kron_linear.backward`."""
    gx, gA, gB = _ops()._cpp_kron_linear_backward(
        g2, x2, reference.compose(A), reference.compose(B), scale, needs[0], needs[1], needs[2], isa)
    return (gx if needs[0] else None, reference.chain(A, gA) if needs[1] else None,
            reference.chain(B, gB) if needs[2] else None)
