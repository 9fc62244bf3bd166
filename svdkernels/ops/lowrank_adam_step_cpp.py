"""The C++ backend of ``lowrank_adam_step`` (``csrc/cpu/lowrank_adam_step*.cpp``).

One GaLore Adam step of a float32 or bfloat16 CPU weight (internal op
``torch.ops.svdkernels._cpp_lowrank_adam_step``): the projection is a GEMM, the
moments are updated in rank space, and one pass over ``W`` back-projects, applies the
scaled step and the decay and rounds (bfloat16: to nearest, or the reference's
stochastic rounding bit for bit), with no full-size temporary. Other dtypes,
non-contiguous weights or moments run the reference.
"""
from __future__ import annotations

from typing import Optional

import torch

CPP_DTYPES = (torch.float32, torch.bfloat16)
"""Weight dtypes the C++ kernel takes."""


def cpp_supports(W: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> bool:
    """Whether the C++ kernel can run this call: a contiguous float32 or bfloat16 CPU
    weight with contiguous moments (the kernel writes them in place by flat index)."""
    return (W.device.type == "cpu" and W.dtype in CPP_DTYPES and W.is_contiguous()
            and exp_avg.is_contiguous() and exp_avg_sq.is_contiguous())


def _seed32(sr_seed: Optional[int]) -> Optional[int]:
    # The rounding stream depends on the seed modulo 2³² only (the reference's sr_key);
    # reducing it here keeps any Python int inside the schema's int64.
    return None if sr_seed is None else sr_seed & 0xFFFFFFFF


def _ops():
    import svdkernels._C  # noqa: F401 - registers the internal ops

    return torch.ops.svdkernels


def lowrank_adam_step(
    W: torch.Tensor, G: torch.Tensor, P: torch.Tensor, P_scale: Optional[torch.Tensor],
    P_zero: Optional[torch.Tensor], exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, right: bool,
    beta1: float, beta2: float, eps: float, step_size: float, decay: float, sr_seed: Optional[int],
    *, isa: int = -1,
) -> None:
    """The step in place, arguments as :func:`svdkernels.reference.lowrank_adam_step.lowrank_adam_step`.

    ``W, G [m, n]``; ``P [r, k]`` float32 or packed int4 ``[r, ceil(k/2)]`` with
    ``P_scale, P_zero [r, ceil(k/256)]``; moments ``[m, r]`` (right) or ``[r, n]`` (left).
    ``isa``: -1 the best this CPU runs, 0 portable C++, 1 AVX2, 2 AVX-512.
    """
    _ops()._cpp_lowrank_adam_step(W, G, P, P_scale, P_zero, exp_avg, exp_avg_sq, right, beta1, beta2, eps,
                                  step_size, decay, _seed32(sr_seed), isa)


def projected_adam_step(
    W: torch.Tensor, R: torch.Tensor, P: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
    right: bool, beta1: float, beta2: float, eps: float, step_size: float, decay: float,
    sr_seed: Optional[int], *, isa: int = -1,
) -> None:
    """The step from the projected gradient ``R`` (float32, the moments' shape) and a
    float32 basis ``P [r, k]``, as :func:`svdkernels.reference.lowrank_adam_step.projected_adam_step`."""
    _ops()._cpp_lowrank_adam_step_projected(W, R, P, exp_avg, exp_avg_sq, right, beta1, beta2, eps, step_size,
                                            decay, _seed32(sr_seed), isa)
