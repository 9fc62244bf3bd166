"""The ``rsvd`` op: batched randomized SVD, ``torch.ops.svdkernels.rsvd``.

Schema, fake (meta) implementation, input validation and backend dispatch. The
algorithm itself is in ``svdkernels/reference/rsvd.py`` (Halko, Martinsson &
Tropp 2011; block Krylov of Musco & Musco 2015; dashSVD's accuracy control);
backends differ only in how they compute the products with ``A``.

Backends. Dense float32/float16/bfloat16 input with the default options runs the
Triton passes on CUDA, and on the CPU the C++ op ``_cpp_rsvd`` (``csrc/cpu/rsvd.cpp``,
the reference's recipe in one dispatch) when ``svdkernels._C`` is built. Everything
else runs the reference backend on any device (its products are cuBLAS/cuSPARSE
calls on CUDA): float64, sparse COO/CSR input, ``center``, ``method="krylov"`` and
``tol``.
"""
from __future__ import annotations

import math
import sys
from typing import NamedTuple, Optional, Union

import torch

from svdkernels.backends import requested_backend, select_backend
from svdkernels.reference import rsvd as reference

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_COMPLEX_DTYPES = (torch.complex64, torch.complex128)
_SKETCH_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_LAYOUTS = (torch.strided, torch.sparse_coo, torch.sparse_csr)
METHODS = ("hmt", "krylov", "dash")
CENTERS = ("columns", "rows")
INT64 = (-(2**63), 2**63 - 1)


def _validate_sparse(A: torch.Tensor) -> None:
    if A.layout not in _LAYOUTS:
        raise TypeError(
            f"A: expected layout torch.strided, torch.sparse_coo or torch.sparse_csr, got {A.layout}"
            " (convert with A.to_sparse_csr() or A.to_dense())"
        )
    if A.layout == torch.strided:
        return
    if A.dim() not in (2, 3):
        raise ValueError(f"A: expected a sparse tensor of shape [m, n] or [B, m, n], got shape {tuple(A.shape)}")
    if A.layout == torch.sparse_coo and A.dense_dim() != 0:
        raise ValueError(f"A: expected a sparse COO tensor with no dense dimensions, got dense_dim()={A.dense_dim()}")
    if A.layout == torch.sparse_csr and A.dense_dim() != 0:
        raise ValueError(f"A: expected a sparse CSR tensor with no dense dimensions, got dense_dim()={A.dense_dim()}")


def validate(
    A: torch.Tensor,
    rank: int,
    oversample: int,
    n_iter: int,
    sketch_dtype: Optional[torch.dtype],
    center: Optional[str] = None,
    method: str = "hmt",
    tol: Optional[float] = None,
    shift_u: Optional[torch.Tensor] = None,
    shift_v: Optional[torch.Tensor] = None,
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument for any bad input."""
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"A: expected a torch.Tensor, got {type(A).__name__}")
    if A.dtype not in _FLOAT_DTYPES + _COMPLEX_DTYPES:
        raise TypeError(f"A: expected dtype float32, float64, float16, bfloat16, complex64 or complex128, got {A.dtype}")
    if A.dim() < 2:
        raise ValueError(f"A: expected a tensor of shape [..., m, n] (at least 2 dims), got shape {tuple(A.shape)}")
    _validate_sparse(A)
    if A.is_complex() and A.layout != torch.strided:
        raise TypeError(f"A: complex input is supported dense (torch.strided) only, got {A.dtype} in {A.layout}")
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
    if sketch_dtype is not None and sketch_dtype not in _SKETCH_DTYPES:
        raise TypeError(f"sketch_dtype: expected None, float32, float64, float16 or bfloat16, got {sketch_dtype}")
    if center is not None and center not in CENTERS:
        raise ValueError(f"center: expected None, True, 'columns' or 'rows', got {center!r}")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if tol is not None:
        if isinstance(tol, bool) or not isinstance(tol, (int, float)):
            raise TypeError(f"tol: expected a float or None, got {type(tol).__name__}")
        if not (math.isfinite(tol) and tol > 0):
            raise ValueError(f"tol: expected a finite float > 0, got {tol}")
        if method == "krylov":
            raise ValueError(f"tol: supported with method='hmt' or 'dash' only, got method={method!r}")
    if (shift_u is None) != (shift_v is None):
        raise ValueError("shift_u, shift_v: expected both or neither, got one")
    if shift_u is not None:
        if center is not None:
            raise ValueError(f"center: expected None when shift_u/shift_v are given, got {center!r}")
        batch = tuple(A.shape[:-2])
        for name, t, size in (("shift_u", shift_u, m), ("shift_v", shift_v, n)):
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.dtype not in _FLOAT_DTYPES + _COMPLEX_DTYPES:
                raise TypeError(f"{name}: expected a dense float tensor, got {type(t).__name__ if not isinstance(t, torch.Tensor) else (t.layout, t.dtype)}")
            try:
                torch.broadcast_shapes(tuple(t.shape), (*batch, size))
                ok = torch.broadcast_shapes(tuple(t.shape), (*batch, size)) == (*batch, size)
            except RuntimeError:
                ok = False
            if not ok:
                raise ValueError(f"{name}: expected a shape broadcastable to {(*batch, size)}, got {tuple(t.shape)}")
            if t.device != A.device:
                raise ValueError(f"{name}: expected device {A.device} (that of A), got {t.device}")


def validate_seed(seed: object) -> None:
    """``seed``: ``None`` or an int64 (what the op's schema carries)."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int or None, got {type(seed).__name__}")
    if not INT64[0] <= seed <= INT64[1]:
        raise ValueError(f"seed: expected an int in [-2**63, 2**63 - 1] (int64), got {seed}")


def _use_triton(A: torch.Tensor, center, method, tol, shift_u) -> bool:
    plain = A.layout == torch.strided and A.dtype in (torch.float32, torch.float16, torch.bfloat16)
    plain = plain and center is None and method == "hmt" and tol is None and shift_u is None
    return plain and select_backend("rsvd", A.device, has_cpp=True) == "triton"


def _use_cpp(A: torch.Tensor, rank, oversample, center, method, tol, shift_u) -> bool:
    """The C++ op (csrc/cpu/rsvd.cpp) for the CPU calls it covers; a forced ``cpp``
    backend with any other call raises rather than running the reference."""
    if select_backend("rsvd", A.device, has_cpp=True) != "cpp":
        return False
    from svdkernels.ops import rsvd_cpp

    if rsvd_cpp.cpp_supports(A, rank, oversample, center, method, tol, shift_u):
        return True
    if requested_backend() == "cpp":
        raise RuntimeError(
            "rsvd: the cpp backend takes dense float32/bfloat16/float16 CPU tensors with method='hmt', no center, "
            f"tol or shift and rank + oversample < min(m, n); got {A.device.type} {A.dtype} {A.layout}, "
            f"method={method!r}, center={center!r}, tol={tol!r}, rank + oversample = {rank + oversample}"
        )
    return False


@torch.library.custom_op("svdkernels::rsvd", mutates_args=())
def rsvd_op(
    A: torch.Tensor,
    rank: int,
    oversample: int,
    n_iter: int,
    seed: Optional[int],
    sketch_dtype: Optional[torch.dtype],
    center: Optional[str] = None,
    method: str = "hmt",
    tol: Optional[float] = None,
    shift_u: Optional[torch.Tensor] = None,
    shift_v: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.svdkernels.rsvd``; see :func:`svdkernels.rsvd` for the contract.

    ``shift_u [..., m]``, ``shift_v [..., n]``: factor ``A − shift_u·shift_vᵀ`` (implicitly),
    the rank-one ``M`` of :func:`svdkernels.linalg.svd_lowrank`.
    """
    validate(A, rank, oversample, n_iter, sketch_dtype, center, method, tol, shift_u, shift_v)
    if seed is None:
        # Drawn from torch's default CPU generator, so torch.manual_seed governs it;
        # drawing here (not in the caller) keeps torch.compile graphs whole.
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    kwargs = dict(oversample=oversample, n_iter=n_iter, seed=seed, sketch_dtype=sketch_dtype)
    if _use_triton(A, center, method, tol, shift_u):
        from svdkernels.triton import rsvd as triton_rsvd

        out = triton_rsvd.rsvd(A, rank, **kwargs)
    elif _use_cpp(A, rank, oversample, center, method, tol, shift_u):
        from svdkernels.ops import rsvd_cpp

        out = rsvd_cpp.rsvd(A, rank, **kwargs)
    else:
        shift = None if shift_u is None else (shift_u, shift_v)
        out = reference.rsvd(A, rank, center=center, shift=shift, method=method, tol=tol, **kwargs)
    # A fixed (contiguous) layout is part of the contract the fake promises; the
    # copies are of the small factors only.
    return tuple(t.contiguous() for t in out)


@rsvd_op.register_fake
def _(A, rank, oversample, n_iter, seed, sketch_dtype, center=None, method="hmt", tol=None, shift_u=None, shift_v=None):
    validate(A, rank, oversample, n_iter, sketch_dtype, center, method, tol, shift_u, shift_v)
    *batch, m, n = A.shape
    real = torch.float64 if A.dtype in (torch.float64, torch.complex128) else torch.float32
    vectors = A.dtype if A.is_complex() else real
    return (
        torch.empty(*batch, m, rank, dtype=vectors, device=A.device),
        torch.empty(*batch, rank, dtype=real, device=A.device),
        torch.empty(*batch, rank, n, dtype=vectors, device=A.device),
    )


def _is_dtensor(A: object) -> bool:
    # No import of torch.distributed.tensor unless it is already loaded (a DTensor
    # cannot exist otherwise), nor where torch has no torch.distributed.
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(A, mod.DTensor)


def rsvd(
    A: torch.Tensor,
    rank: int,
    *,
    oversample: int = 10,
    n_iter: int = 2,
    seed: Optional[int] = None,
    sketch_dtype: Optional[torch.dtype] = None,
    center: Union[bool, str, None] = None,
    method: str = "hmt",
    tol: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched randomized SVD: ``A ≈ U·diag(S)·Vh`` of rank ``rank``.

    Halko, Martinsson & Tropp (2011): a Gaussian sketch of ``rank + oversample``
    columns, independent for every batch element, ``n_iter`` steps of subspace
    iteration, Cholesky-QR orthonormalisation (GEMM-only, no host synchronisation)
    and the SVD of the small projected matrix. Scale-invariant: ``rsvd(c·A)`` gives
    ``c·S`` for any ``c`` that keeps ``c·A`` finite (1e-30 and 1e18 included).

    Args:
        A: ``[..., m, n]`` float32, float64, float16, bfloat16, complex64 or complex128,
            any number of batch dims, any device; or sparse (real): COO ``[m, n]``/
            ``[B, m, n]`` or CSR ``[m, n]``/``[B, m, n]`` (never densified: products are
            CSR × dense, ``O(nnz)`` extra memory for CSR copies of ``A`` and ``Aᵀ``).
            Complex ``A`` runs the reference backend with conjugate transposes, a complex
            Gaussian test matrix and Householder QR (as float64). Every entry must be finite.
        rank: number of singular triplets, ``1 <= rank <= min(m, n)``.
        oversample: extra sketch columns. ``rank + oversample >= min(m, n)``
            computes an exact SVD instead (dense ``A``; sparse ``A`` gets a sketch of
            ``min(m, n)`` columns, which spans its range exactly).
        n_iter: power (subspace) iterations; each costs two passes over ``A``
            (with ``tol``: the most it may do).
        seed: the same seed gives the same result on every call (on a given
            device and backend). ``None`` draws one from torch's default generator.
            An int64: ``-2**63 <= seed < 2**63``.
        sketch_dtype: operand precision of the sketch and power passes. ``None``
            picks bfloat16 for float32 input on devices with native bfloat16
            matmul and float32 for float64 input (the last range pass and the
            projection always read ``A`` in its own precision, so accuracy is that
            of the input's dtype; see ``svdkernels/reference/rsvd.py``), else the
            input's dtype. Ignored for
            sparse or complex ``A``, ``method="krylov"``/``"dash"`` and ``tol`` (every
            pass then reads ``A`` in its working precision).
        center: ``None``/``False``: factor ``A``. ``True`` or ``"columns"``: factor
            ``A − 1·mean(A, dim=-2)`` (each column centred: PCA with samples as rows,
            ``torch.pca_lowrank``'s centring); ``"rows"``: ``A − mean(A, dim=-1)·1ᵀ``.
            Applied implicitly, as a rank-one correction of every product: a sparse
            ``A`` is never densified.
        method: all three make the same ``2·n_iter + 2`` passes over ``A``.
            ``"hmt"``: subspace iteration (the default). ``"krylov"``: block Krylov
            (Musco & Musco 2015), a basis of ``(n_iter + 1)·(rank + oversample)``
            columns: the lowest error at equal passes on slowly decaying spectra (more
            FLOPs in the thin products). ``"dash"``: dashSVD's shifted power iteration
            (Feng et al. 2024): iterates with ``A·Aᵀ − α·I``, ``α`` updated from the
            smallest estimated eigenvalue; the basis stays ``rank + oversample`` wide, one
            orthonormalisation per iteration; equal to HMT at ``n_iter=1`` (the first
            step is unshifted), lower error than HMT from ``n_iter=2`` on.
        tol: dashSVD's accuracy control: stop the power iteration once
            ``max_{i≤k} |σ_i(t)² − σ_i(t−1)²| / σ_{k+1}(t)²`` (the PVE criterion on
            successive estimates) is below ``tol`` for every matrix in the batch
            (``"hmt"`` and ``"dash"``; dashSVD uses 1e-2). One host synchronisation
            per iteration. For a rank chosen by the captured energy see :func:`rsvd_pve`.

    Returns:
        ``U [..., m, rank]`` with orthonormal columns, ``S [..., rank]`` descending,
        ``Vh [..., rank, n]`` with orthonormal rows; float64 for float64 ``A``, else
        float32 (complex ``A``: ``U``, ``Vh`` in its dtype, ``S`` real of its precision);
        contiguous, dense.
        Exception: where ``A`` has exact rank below ``rank`` (an all-zero matrix,
        say), the vectors of the exactly-zero singular values are returned as zero
        vectors rather than an arbitrary orthonormal completion (completing them
        without a host synchronisation would cost every call a second sketch);
        float64 input (Householder QR and a full SVD of the small matrix) returns
        an orthonormal completion instead.

    Backends: dense float32/16-bit input with ``center``, ``method`` and ``tol`` at
    their defaults runs the Triton passes on CUDA and the C++ op on the CPU (when
    ``svdkernels._C`` is built); float64, complex, sparse, centred,
    Krylov, dash and ``tol`` calls run the reference backend (torch products) on any device.
    A ``DTensor`` on a 1-D mesh (``Shard(-2)``, ``Shard(-1)`` or ``Replicate()``) runs
    :func:`svdkernels.ops.rsvd_sharded.rsvd_sharded`: local passes, one all-reduce of an
    ``l×l`` Gram per orthonormalisation, ``U``/``S``/``Vh`` as DTensors.

    Raises:
        ValueError: naming ``A`` if it holds NaN or Inf; naming the argument for a
            bad rank, oversample, n_iter, seed, center, method or tol.
        TypeError: naming ``A`` for an unsupported dtype or sparse layout.

    Example::

        A = torch.randn(8, 1024, 512)
        U, S, Vh = svdkernels.rsvd(A, 32, seed=0)   # [8,1024,32], [8,32], [8,32,512]
        U, S, Vh = svdkernels.rsvd(A, 32, method="krylov", seed=0)  # same passes, lower error
        X = torch.sparse_coo_tensor(idx, val, (100_000, 50_000))
        U, S, Vh = svdkernels.rsvd(X, 16, center=True)  # PCA of a sparse matrix
    """
    if _is_dtensor(A):
        from svdkernels.ops.rsvd_sharded import rsvd_sharded  # on use: torch.distributed.tensor

        return rsvd_sharded(A, rank, oversample=oversample, n_iter=n_iter, seed=seed, sketch_dtype=sketch_dtype,
                            center=center, method=method, tol=tol)
    if center is True:
        center = "columns"
    elif center is False:
        center = None
    # Validated here too: the dispatcher's own type check would otherwise answer
    # first, without naming what was expected.
    validate(A, rank, oversample, n_iter, sketch_dtype, center, method, tol)
    validate_seed(seed)
    if tol is not None:
        tol = float(tol)
    return torch.ops.svdkernels.rsvd(A, rank, oversample, n_iter, seed, sketch_dtype, center, method, tol)


class PVEResult(NamedTuple):
    """:func:`rsvd_pve`'s result: factors padded to the batch's largest chosen rank."""

    U: torch.Tensor  # [..., m, r_max]
    S: torch.Tensor  # [..., r_max]
    Vh: torch.Tensor  # [..., r_max, n]
    rank: torch.Tensor  # [...] int64


def _energy(A: torch.Tensor, center: Optional[str]) -> torch.Tensor:
    """``[B]`` float64 ``‖A_b‖_F²`` of every matrix (centred if asked), never densifying a sparse ``A``.

    Centring by columns: ``‖A − 1·μᵀ‖² = ‖A‖² − m·‖μ‖²`` (rows: ``− n·‖ν‖²``), in float64.
    """
    m, n = A.shape[-2:]
    if A.layout == torch.strided:
        A3 = A.reshape(-1, m, n)
        # Reduced in float64 (16-bit input would overflow a 16-bit norm).
        wide = torch.complex128 if A3.is_complex() else torch.float64
        norm2 = torch.linalg.vector_norm(A3, dim=(-2, -1), dtype=wide) ** 2
        if center is not None:
            mean = A3.mean(-2, dtype=wide) if center == "columns" else A3.mean(-1, dtype=wide)
            norm2 = norm2 - (m if center == "columns" else n) * torch.linalg.vector_norm(mean, dim=-1) ** 2
        return norm2.clamp_min(0)
    mats = reference.sparse_matrices(A)
    norm2 = torch.stack([M.values().double().pow(2).sum() for M in mats])
    if center is not None:
        ones = torch.ones(n if center == "rows" else m, 1, dtype=torch.float64, device=A.device)
        sums = torch.stack([
            (M.double() @ ones if center == "rows" else reference.csr_transpose(M.double()) @ ones)[:, 0] for M in mats
        ])
        size = m if center == "columns" else n
        norm2 = norm2 - sums.pow(2).sum(-1) / size  # size·‖sums/size‖²
    return norm2.clamp_min(0)


def rsvd_pve(
    A: torch.Tensor,
    pve: float = 0.9,
    *,
    max_rank: Optional[int] = None,
    block: int = 16,
    oversample: int = 10,
    n_iter: int = 2,
    seed: Optional[int] = None,
    center: Union[bool, str, None] = None,
    method: str = "hmt",
    tol: Optional[float] = None,
) -> PVEResult:
    """Randomized SVD with the rank chosen per matrix by the captured energy (PVE).

    The PVE criterion of dashSVD (Feng, Yu, Xie & Tang 2024, TOMS Alg. 1043; the
    "percentage of variance explained" of PCA): for every matrix ``A_b`` of the batch
    the rank is the smallest ``r`` with

        ``Σ_{i≤r} σ̃_i² ≥ pve · ‖A_b‖_F²``

    where ``σ̃`` are the randomized estimates and ``‖A_b‖_F²`` is exact (one pass,
    ``O(nnz)`` for sparse ``A``; of the centred matrix with ``center``). Because the
    rank-``r`` result is ``U_r·U_rᵀ·A`` (a projection), ``Σ_{i≤r} σ̃_i² = ‖U_rᵀA‖_F²``: the
    returned rank-``r`` factors capture at least ``pve`` of the energy, and since
    ``σ̃_i ≤ σ_i`` the rank is never below the exact SVD's (above it by however much the
    estimates fall short; more ``n_iter`` or ``method="krylov"`` closes the gap).

    The sketch grows: :func:`rsvd` at rank ``block``, then ``2·block``, ``4·block``, …
    up to ``max_rank`` (a fresh sketch each time, same seed), until every matrix of
    the batch reaches ``pve``: at most about twice the work of one call at the final
    rank. A matrix that does not reach ``pve`` within ``max_rank`` gets
    ``rank = max_rank`` (check ``S.pow(2).sum(-1)`` against ``‖A‖_F²`` to tell); an
    all-zero matrix gets rank 0.

    Batched results are padded (the shapes must be the batch's): ``U``, ``S``, ``Vh``
    have ``r_max = max(rank)`` columns/values/rows, and for matrix ``b`` those past
    ``rank[b]`` are exactly zero, so ``U·diag(S)·Vh`` is the rank-``rank[b]``
    approximation with no masking. As ``torch.linalg.lstsq`` returns its ``rank``, the
    ranks come back as an int64 tensor. The rank loop synchronises with the host
    (data-dependent shapes): not for ``torch.compile(fullgraph=True)``; :func:`rsvd`
    with a fixed rank is.

    Args:
        A: as :func:`rsvd` (dense, sparse COO/CSR, complex, any batch dims).
        pve: the energy fraction to capture, ``0 < pve <= 1``.
        max_rank: the largest rank allowed; ``min(m, n)`` by default.
        block: the first rank tried, ``>= 1``.
        oversample, n_iter, seed, center, method, tol: as :func:`rsvd`.

    Returns:
        ``PVEResult(U [..., m, r_max], S [..., r_max], Vh [..., r_max, n], rank [...] int64)``.

    Example::

        U, S, Vh, rank = svdkernels.rsvd_pve(W, 0.9, max_rank=128)  # rank: [*batch]
    """
    if isinstance(pve, bool) or not isinstance(pve, (int, float)):
        raise TypeError(f"pve: expected a float in (0, 1], got {type(pve).__name__}")
    if not (math.isfinite(pve) and 0 < pve <= 1):
        raise ValueError(f"pve: expected a float in (0, 1], got {pve}")
    if not isinstance(A, torch.Tensor) or A.dim() < 2:
        validate(A, 1, oversample, n_iter, None)  # raises, naming A
    p = min(A.shape[-2:])
    if max_rank is None:
        max_rank = p
    for name, value in (("max_rank", max_rank), ("block", block)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if not 1 <= max_rank <= p:
        raise ValueError(f"max_rank: expected 1 <= max_rank <= min(m, n) = {p}, got {max_rank}")
    if block < 1:
        raise ValueError(f"block: expected >= 1, got {block}")
    center = "columns" if center is True else (None if center is False else center)
    validate(A, min(block, max_rank), oversample, n_iter, None, center, method, tol)
    validate_seed(seed)
    if seed is None:  # one seed for every growth step
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    *batch, m, n = A.shape
    norm2 = _energy(A, center) if math.prod(batch) > 0 else torch.zeros(0, dtype=torch.float64)
    k = min(block, max_rank)
    while True:
        U, S, Vh = rsvd(A, k, oversample=oversample, n_iter=n_iter, seed=seed, center=center, method=method, tol=tol)
        captured = S.reshape(-1, k).double().pow(2).cumsum(-1)  # [B, k]
        short = (captured < pve * norm2.unsqueeze(-1)).sum(-1)  # values before the target is reached
        if k == max_rank or bool((short < k).all()):
            break
        k = min(2 * k, max_rank)
    rank = torch.where(norm2 > 0, (short + 1).clamp_max(k), torch.zeros_like(short)).reshape(batch)
    r_max = int(rank.max()) if rank.numel() else 0
    keep = torch.arange(r_max, device=S.device) < rank.unsqueeze(-1).to(S.device)  # [..., r_max]
    U = U[..., :r_max] * keep.unsqueeze(-2)
    Vh = Vh[..., :r_max, :] * keep.unsqueeze(-1)
    S = S[..., :r_max] * keep
    return PVEResult(U, S, Vh, rank)
