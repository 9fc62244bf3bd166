"""The ``rsvd`` op: batched randomized SVD, ``torch.ops.svdkernels.rsvd``.

Schema, fake (meta) implementation, input validation and backend dispatch. The
algorithm itself is in ``svdkernels/reference/rsvd.py`` (Halko, Martinsson &
Tropp 2011); backends differ only in how they compute the products with ``A``.
"""
from __future__ import annotations

from typing import Optional

import torch

from svdkernels.backends import select_backend
from svdkernels.reference import rsvd as reference

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def validate(
    A: torch.Tensor,
    rank: int,
    oversample: int,
    n_iter: int,
    sketch_dtype: Optional[torch.dtype],
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument for any bad input."""
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"A: expected a torch.Tensor, got {type(A).__name__}")
    if A.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"A: expected dtype float32, float16 or bfloat16, got {A.dtype}")
    if A.dim() < 2:
        raise ValueError(f"A: expected a tensor of shape [..., m, n] (at least 2 dims), got shape {tuple(A.shape)}")
    for name, value in (("rank", rank), ("oversample", oversample), ("n_iter", n_iter)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    m, n = A.shape[-2:]
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank: expected 1 <= rank <= min(m, n) = {min(m, n)} for A of shape {tuple(A.shape)}, got {rank}")
    if oversample < 0:
        raise ValueError(f"oversample: expected >= 0, got {oversample}")
    if n_iter < 0:
        raise ValueError(f"n_iter: expected >= 0, got {n_iter}")
    if sketch_dtype is not None and sketch_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"sketch_dtype: expected None, float32, float16 or bfloat16, got {sketch_dtype}")


@torch.library.custom_op("svdkernels::rsvd", mutates_args=())
def rsvd_op(
    A: torch.Tensor,
    rank: int,
    oversample: int,
    n_iter: int,
    seed: Optional[int],
    sketch_dtype: Optional[torch.dtype],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.svdkernels.rsvd``; see :func:`svdkernels.rsvd` for the contract."""
    validate(A, rank, oversample, n_iter, sketch_dtype)
    if seed is None:
        # Drawn from torch's default CPU generator, so torch.manual_seed governs it;
        # drawing here (not in the caller) keeps torch.compile graphs whole.
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    kwargs = dict(oversample=oversample, n_iter=n_iter, seed=seed, sketch_dtype=sketch_dtype)
    if select_backend("rsvd", A.device) == "triton":
        from svdkernels.triton import rsvd as triton_rsvd

        out = triton_rsvd.rsvd(A, rank, **kwargs)
    else:
        out = reference.rsvd(A, rank, **kwargs)
    # A fixed (contiguous) layout is part of the contract the fake promises; the
    # copies are of the small factors only.
    return tuple(t.contiguous() for t in out)


@rsvd_op.register_fake
def _(A, rank, oversample, n_iter, seed, sketch_dtype):
    validate(A, rank, oversample, n_iter, sketch_dtype)
    *batch, m, n = A.shape
    new = A.new_empty
    return (
        new(*batch, m, rank, dtype=torch.float32),
        new(*batch, rank, dtype=torch.float32),
        new(*batch, rank, n, dtype=torch.float32),
    )


def rsvd(
    A: torch.Tensor,
    rank: int,
    *,
    oversample: int = 10,
    n_iter: int = 2,
    seed: Optional[int] = None,
    sketch_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched randomized SVD: ``A ≈ U·diag(S)·Vh`` of rank ``rank``.

    Halko, Martinsson & Tropp (2011): a Gaussian sketch of ``rank + oversample``
    columns, independent for every batch element, ``n_iter`` steps of subspace
    iteration, Cholesky-QR orthonormalisation (GEMM-only, no host synchronisation)
    and the SVD of the small projected matrix.

    Args:
        A: ``[..., m, n]`` float32, float16 or bfloat16, any number of batch dims,
            any device.
        rank: number of singular triplets, ``1 <= rank <= min(m, n)``.
        oversample: extra sketch columns. ``rank + oversample >= min(m, n)``
            computes an exact SVD instead.
        n_iter: power (subspace) iterations; each costs two passes over ``A``.
        seed: the same seed gives the same result on every call (on a given
            device and backend). ``None`` draws one from torch's default generator.
        sketch_dtype: operand precision of the sketch and power passes. ``None``
            picks bfloat16 for float32 input on devices with native bfloat16
            matmul (the last range pass and the projection always read ``A`` in
            its own precision, so accuracy is that of float32; see
            ``svdkernels/reference/rsvd.py``), else the input's dtype.

    Returns:
        ``U [..., m, rank]`` with orthonormal columns, ``S [..., rank]`` descending,
        ``Vh [..., rank, n]`` with orthonormal rows; all float32 and contiguous.
        Exception: where ``A`` has exact rank below ``rank`` (an all-zero matrix,
        say), the vectors of the exactly-zero singular values are returned as zero
        vectors rather than an arbitrary orthonormal completion (completing them
        without a host synchronisation would cost every call a second sketch).

    Example::

        A = torch.randn(8, 1024, 512)
        U, S, Vh = svdkernels.rsvd(A, 32, seed=0)   # [8,1024,32], [8,32], [8,32,512]
    """
    # Validated here too: the dispatcher's own type check would otherwise answer
    # first, without naming what was expected.
    validate(A, rank, oversample, n_iter, sketch_dtype)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed: expected an int or None, got {type(seed).__name__}")
    return torch.ops.svdkernels.rsvd(A, rank, oversample, n_iter, seed, sketch_dtype)
