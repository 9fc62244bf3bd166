"""Randomized SVD of a DTensor sharded on a 1-D device mesh: ``rsvd_sharded``.

The algorithm is the reference rsvd's (Halko, Martinsson & Tropp 2011, Alg. 4.4 +
5.1: Gaussian sketch, ``n_iter`` subspace iterations, Cholesky-QR bases, the SVD of
the small projection through its Gram), with ``A``'s rows spread over the ranks
(Dion, Ahn et al. 2025, distributes its power iteration the same way):

    Y_r = A_r·Ω                      local: every rank holds all of Ω [n, l]
    Q_r = Y_r·R⁻¹,  RᵀR = Σ_r Y_rᵀY_r  one all-reduce of the l×l Gram (float64)
    Z   = Σ_r A_rᵀ·Q_r               one all-reduce of [n, l]; Z is then replicated
    ...                              (Z's own basis is local: every rank holds all of Z)
    Bᵀ  = Σ_r A_rᵀ·Q_r               the projection, one all-reduce of [n, l]
    eigh(B·Bᵀ) -> W, Σ;  U_r = Q_r·W, V = orth(Bᵀ·W·Σ⁻¹)   local

So the products with ``A`` are local, every orthonormalisation of a row-sharded
basis is exactly one all-reduce of an ``l×l`` Gram, and the only other traffic is
the ``n×l`` sum of each transposed product, which ``Vh [k, n]`` needs anyway. No
rank ever holds more of ``A`` than its shard. Per rank and matrix, with ``q =
n_iter``: ``(q + 2)`` Grams of ``l²`` float64 and ``(q + 1)`` sums of ``n·l``
float32 (:func:`allreduce_bytes`).

Placements: ``Shard(-2)`` runs the above; ``Shard(-1)`` runs it on ``Aᵀ`` (a view of
the local shard, rows of ``Aᵀ`` sharded) and swaps the factors; ``Replicate()``
computes on every rank what one process would, with no communication.

Seed. ``Ω`` is the reference's ``gaussian(B, n, l, seed)``: it is indexed by ``A``'s
columns, which every rank holds whole, so each rank draws the same ``Ω`` whatever the
world size, and the row-sharded result equals the single-process
``svdkernels.reference.rsvd.rsvd(A, rank, seed=seed, sketch_dtype=torch.float32)``
to fp32 rounding (``Shard(-1)``: that of ``Aᵀ``, transposed back).

Numerics that differ from the reference, and why: every Gram is accumulated in
float64 (the reference uses float32 for the bases between passes) because the
power-of-two scaling that protects a float32 Gram needs ``max |Y|`` over all ranks,
a second collective; in float64 the Gram of any finite float32 ``Y`` neither
overflows nor underflows, and the scale is then taken from the reduced Gram's
diagonal. A sketch ``l >= min(m, n)`` is clamped to ``min(m, n)`` (it spans the
range exactly) where the reference switches to a dense SVD, which would need the
whole matrix on one rank.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from svdkernels.ops.rsvd import validate, validate_seed
from svdkernels.reference.cholqr import cholesky_factor, cholqr
from svdkernels.reference.rsvd import gaussian

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def _no_comm(t: torch.Tensor) -> torch.Tensor:
    return t


def _group_sum(group: dist.ProcessGroup) -> AllReduce:
    def reduce(t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        dist.all_reduce(t, group=group)  # looked up on each call, so a test can count the calls
        return t

    return reduce


def _sharded_cholqr(Y: torch.Tensor, m: int, allreduce: AllReduce) -> torch.Tensor:
    """One Cholesky-QR pass of a row-sharded ``Y`` (local ``[B, m_r, l]``, ``m`` rows in all).

    One all-reduce of the float64 Gram ``[B, l, l]``; the factorisation (shifted where
    the plain Cholesky fails, as in ``reference.cholqr``) is computed redundantly on
    every rank, so ``R`` is the same everywhere. ``Q``'s rows are ``Y``'s rows.
    """
    Yd = Y.double()
    G = allreduce(Yd.mT @ Yd)
    if not bool(torch.isfinite(G).all()):  # the same on every rank: all raise, none waits
        raise ValueError("A: expected finite entries, got a non-finite sketch (A holds NaN or Inf, "
                         "or entries so large that products with A overflow float32)")
    # The power of two bringing ‖Y‖ near 1, from the reduced Gram (tr G = ‖Y‖²_F), keeps
    # R⁻¹ in float32 range whatever Y's magnitude; exact, so Q does not depend on it.
    norm = G.diagonal(dim1=-2, dim2=-1).sum(-1).sqrt()[..., None, None]
    _, e = torch.frexp(norm)
    c = torch.where(norm > 0, torch.ldexp(torch.ones_like(norm), -e), torch.ones_like(norm))
    R = cholesky_factor(G * c * c, m)
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    R_inv = torch.linalg.solve_triangular(R, eye, upper=True)
    return (Y * c.to(Y.dtype)) @ R_inv.to(Y.dtype)


def rsvd_rows(A: torch.Tensor, m: int, rank: int, width: int, n_iter: int, seed: int,
              allreduce: AllReduce) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The row-sharded algorithm on local shards (module docstring).

    ``A`` is this rank's ``[B, m_r, n]`` float32/float64 (``m_r`` may be 0), ``m`` the
    global row count, ``allreduce`` an in-place-or-returning sum over the ranks.
    Returns ``U_r [B, m_r, rank]`` (this rank's rows), ``S [B, rank]`` and
    ``V [B, n, rank]`` (both the same on every rank).
    """
    B, _, n = A.shape
    orth = lambda Y: _sharded_cholqr(Y, m, allreduce)  # noqa: E731
    omega = gaussian(B, n, width, seed, A.device).to(A.dtype)
    Y = A @ omega
    for _ in range(n_iter):
        Z = allreduce((orth(Y).mT @ A).mT)
        # Z is whole on every rank: its basis needs no communication (n rows, not m).
        Y = A @ cholqr(Z, gram_dtype=torch.float64)
    Q = orth(orth(Y))  # CholeskyQR2: orthonormal to working precision
    Bt = allreduce((Q.mT @ A).mT)  # [B, n, l] = Aᵀ·Q
    # The small SVD through the l×l Gram of Bᵀ, as reference._small_svd_by_gram.
    Btd = Bt.double()
    lam, W = torch.linalg.eigh(Btd.mT @ Btd)
    W = W.flip(-1)[..., :rank]
    S = lam.flip(-1)[..., :rank].clamp_min(0).sqrt()
    U = Q @ W.to(A.dtype)
    inv = torch.where(S > 0, S.reciprocal(), torch.zeros_like(S))  # zero σ: zero vectors, as the reference
    V = cholqr(Bt @ (W * inv.unsqueeze(-2)).to(A.dtype), gram_dtype=A.dtype)
    return U, S.to(A.dtype), V


def allreduce_bytes(batch: int, n: int, width: int, n_iter: int, itemsize: int = 4) -> int:
    """Bytes one rank all-reduces (the payload handed to ``all_reduce``) for a row-sharded
    ``[batch, m, n]`` (``n``: the unsharded dimension; for ``Shard(-1)`` it is ``m``).

    ``n_iter + 2`` float64 Grams ``[batch, l, l]`` and ``n_iter + 1`` sums ``[batch, n, l]``
    in the working dtype (``itemsize``). A ring all-reduce moves about twice this over
    each rank's link (reduce-scatter then all-gather).
    """
    return (n_iter + 2) * batch * width * width * 8 + (n_iter + 1) * batch * n * width * itemsize


def _placement(A: DTensor) -> str:
    """``"rows"``, ``"cols"`` or ``"replicate"``; ``ValueError`` naming anything else."""
    mesh = A.device_mesh
    if mesh.ndim != 1:
        raise ValueError(f"A: expected a DTensor on a 1-D device mesh, got a {mesh.ndim}-D mesh of shape {tuple(mesh.shape)}")
    (p,) = A.placements
    if isinstance(p, Replicate):
        return "replicate"
    if isinstance(p, Shard):
        d = p.dim % A.dim()
        if d == A.dim() - 2:
            return "rows"
        if d == A.dim() - 1:
            return "cols"
    raise ValueError(f"A: expected placement Shard(-2) (rows), Shard(-1) (columns) or Replicate() "
                     f"on a 1-D mesh, got {p!r} for A of shape {tuple(A.shape)} (batch dims must be replicated)")


def rsvd_sharded(
    A: DTensor,
    rank: int,
    *,
    oversample: int = 10,
    n_iter: int = 2,
    seed: Optional[int] = None,
    sketch_dtype: Optional[torch.dtype] = None,
    center: object = None,
    method: str = "hmt",
    tol: Optional[float] = None,
) -> tuple[DTensor, DTensor, DTensor]:
    """Randomized SVD ``A ≈ U·diag(S)·Vh`` of a sharded ``A``: :func:`svdkernels.rsvd` for DTensors.

    Args:
        A: DTensor ``[..., m, n]`` (float32, float64, float16, bfloat16) on a 1-D mesh,
            placed ``Shard(-2)`` (rows), ``Shard(-1)`` (columns) or ``Replicate()``;
            batch dims are never sharded. Shards may be uneven, hold fewer rows than
            the sketch width, or be empty.
        rank, oversample, n_iter: as :func:`svdkernels.rsvd` (same defaults and checks).
        seed: the same seed gives the same result for every world size. ``None``
            draws one on the mesh's first rank from torch's default generator and
            broadcasts it (one extra collective).
        sketch_dtype, center, method, tol: accepted so :func:`svdkernels.rsvd` can pass
            its arguments through; only their defaults are supported sharded (every
            pass here reads ``A`` in float32, float64 for float64 input).

    Returns:
        ``U [..., m, rank]`` placed like ``A``'s rows (``Shard(-2)`` for row-sharded
        ``A``, else ``Replicate()``), ``S [..., rank]`` ``Replicate()``, ``Vh [..., rank, n]``
        placed like ``A``'s columns; float64 for float64 ``A``, else float32.

    Communication: :func:`allreduce_bytes` per rank (none for ``Replicate()``); one
    all-reduce of an ``l×l`` Gram per orthonormalisation of a sharded basis.
    """
    if not isinstance(A, DTensor):
        raise TypeError(f"A: expected a DTensor (use svdkernels.rsvd for a plain tensor), got {type(A).__name__}")
    if A.is_complex():  # checked here too: the sharded passes are real-only whatever validate accepts
        raise TypeError(f"A: expected dtype float32, float64, float16 or bfloat16 for a sharded A, got {A.dtype}")
    validate(A, rank, oversample, n_iter, sketch_dtype, None, method, tol)
    validate_seed(seed)
    for name, value, default in (("sketch_dtype", sketch_dtype, None), ("center", center, None),
                                 ("method", method, "hmt"), ("tol", tol, None)):
        if value is not default and value != default and not (name == "center" and value is False):
            raise ValueError(f"{name}: only the default ({default!r}) is supported for a sharded A, got {value!r}")
    kind = _placement(A)
    mesh = A.device_mesh
    group = mesh.get_group()
    if seed is None:
        s = torch.randint(0, 2**62, (1,), dtype=torch.int64) if mesh.get_local_rank() == 0 else torch.zeros(1, dtype=torch.int64)
        dist.broadcast(s, group_src=0, group=group)
        seed = int(s.item())
    *batch, m, n = A.shape
    real = torch.float64 if A.dtype == torch.float64 else torch.float32
    local = A.to_local()
    local = local if local.dtype == real else local.to(real)  # a copy of this shard only (16-bit input)
    B = math.prod(batch)
    width = min(rank + oversample, m, n)
    allreduce = _no_comm if kind == "replicate" else _group_sum(group)
    if kind == "cols":  # the row algorithm on Aᵀ: its rows are A's columns, sharded
        U_t, S, V_t = rsvd_rows(local.reshape(B, m, -1).mT, n, rank, width, n_iter, seed, allreduce)
        U_loc, Vh_loc = V_t, U_t.mT
    else:
        U_loc, S, V = rsvd_rows(local.reshape(B, -1, n), m, rank, width, n_iter, seed, allreduce)
        Vh_loc = V.mT
    U_loc = U_loc.reshape(*batch, -1, rank).contiguous()
    Vh_loc = Vh_loc.reshape(*batch, rank, -1).contiguous()
    S = S.reshape(*batch, rank)
    rows = [Shard(len(batch))] if kind == "rows" else [Replicate()]
    cols = [Shard(len(batch) + 1)] if kind == "cols" else [Replicate()]

    def wrap(t: torch.Tensor, placements: list, shape: tuple[int, ...]) -> DTensor:
        stride = torch.empty(shape, device="meta").stride()  # the global tensor is contiguous
        return DTensor.from_local(t, mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride)

    return (wrap(U_loc, rows, (*batch, m, rank)), wrap(S, [Replicate()], (*batch, rank)),
            wrap(Vh_loc, cols, (*batch, rank, n)))
