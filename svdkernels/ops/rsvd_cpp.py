"""The C++ backend of ``rsvd`` on the CPU (``csrc/cpu/rsvd.cpp``).

One call of the internal op ``torch.ops.svdkernels._cpp_rsvd`` runs the whole
randomized SVD with the reference's recipe (Halko, Martinsson & Tropp 2011; the same
pass precisions, the same Gaussian test matrix for a seed, Cholesky QR with the
same Gram precisions and shift), so results equal ``reference.rsvd``'s to rounding.
It takes dense float32/bfloat16/float16 CPU input with ``method="hmt"`` and no
``center``/``tol``/shift, where the basis is narrower than ``min(m, n)``; every other
call runs the reference. Where the C++ op reports a non-finite projection or a Gram
that stays indefinite, the call is rerun on the reference, which raises (NaN/Inf in
``A``) or rescales (overflowing products) as it always has.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from svdkernels.reference import rsvd as reference

CPP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Dtypes of ``A`` (and of the sketch passes) the C++ op takes."""


def cpp_supports(
    A: torch.Tensor,
    rank: int,
    oversample: int,
    center: Optional[str] = None,
    method: str = "hmt",
    tol: Optional[float] = None,
    shift: object = None,
) -> bool:
    """Whether the C++ op runs this (validated) call."""
    if not (A.device.type == "cpu" and A.layout == torch.strided and A.dtype in CPP_DTYPES):
        return False
    if center is not None or method != "hmt" or tol is not None or shift is not None:
        return False
    m, n = A.shape[-2:]
    # As wide as the matrix: the reference computes an exact SVD instead.
    return rank + oversample < min(m, n) and math.prod(A.shape[:-2]) > 0


def _ops():
    import svdkernels._C  # noqa: F401 - registers the internal ops

    return torch.ops.svdkernels


def plan_dtypes(A: torch.Tensor, n_iter: int, sketch_dtype: Optional[torch.dtype]) -> tuple[torch.dtype, torch.dtype]:
    """``(sketch, last)``: the dtypes the sketch/power passes and the last two passes
    read ``A`` in, as :func:`reference.plan_passes` plans them for the CPU's torch products."""
    dtype = reference.working_dtype(A.dtype, A.device)
    if sketch_dtype is None:
        sketch_dtype = reference.default_sketch_dtype(dtype, A.device)
    plan = reference.plan_passes(dtype, n_iter, sketch_dtype, reference.TORCH_PASSES.exact_16bit_products)
    return plan[0].dtype if n_iter > 0 else sketch_dtype, plan[-1].dtype


def rsvd(
    A: torch.Tensor, rank: int, *, oversample: int, n_iter: int, seed: int,
    sketch_dtype: Optional[torch.dtype] = None, isa: int = -1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U [..., m, rank]``, ``S [..., rank]``, ``Vh [..., rank, n]`` float32 of a call
    :func:`cpp_supports` accepts (validated by the op). ``isa``: -1 the best this CPU
    runs, 0 portable C++, 1 AVX2, 2 AVX-512 (3 runs as 2)."""
    *batch, m, n = A.shape
    sketch, last = plan_dtypes(A, n_iter, sketch_dtype)
    if last != torch.float32 or sketch not in CPP_DTYPES:
        # A plan the C++ op does not follow (a float64 sketch, say): the reference.
        return reference.rsvd(A, rank, oversample=oversample, n_iter=n_iter, seed=seed, sketch_dtype=sketch_dtype)
    A3 = A.reshape(-1, m, n)
    U, S, Vh, status = _ops()._cpp_rsvd(A3, rank, rank + oversample, n_iter, seed, sketch, isa)
    if status != 0:
        return reference.rsvd(A, rank, oversample=oversample, n_iter=n_iter, seed=seed, sketch_dtype=sketch_dtype)
    return U.reshape(*batch, m, rank), S.reshape(*batch, rank), Vh.reshape(*batch, rank, n)
