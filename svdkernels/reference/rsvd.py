"""Batched randomized SVD in plain PyTorch: the reference backend and the driver.

Halko, Martinsson & Tropp (2011), "Finding structure with randomness", Alg. 4.4
(randomized subspace iteration) followed by Alg. 5.1 (direct SVD), for a batch
``A [B, m, n]``, target rank ``k`` and ``l = k + oversample`` columns:

    Y = A·Ω                      Ω [n, l] Gaussian, independent per batch element
    Q = orth(Y)
    repeat n_iter times:
        Z = orth(Aᵀ·Q);  Q = orth(A·Z)
    Bᵀ = Aᵀ·Q                   (B = QᵀA, [l, n])
    B = Ũ·Σ·Vᵀ                  via the eigendecomposition of B·Bᵀ
    U = Q·Ũ[:, :k],  S = Σ[:k],  Vh = Vᵀ[:k]

The ``2·n_iter + 2`` products with ``A`` ("passes") are the whole cost; a backend
supplies them through :class:`Passes` and this driver does the rest (thin GEMMs
and ``l×l`` factorisations), so every backend shares one numerical recipe.

Precision plan. Only the last range pass and the projection pass have to see ``A``
exactly: rounding the *right-hand* operand of a pass only changes the test matrix,
and the passes before the last only steer the subspace, which the last range pass
(exact ``A`` times a well-aligned test matrix) and the projection then resolve to
working precision. So for float32 input the sketch and power passes run in
``sketch_dtype`` (bfloat16 by default where the device multiplies it natively,
about 3x faster on AVX512-BF16 CPUs, far more on tensor cores) and the last two
in float32 (Connolly, Higham & Pranesh 2022 analyse such mixed-precision sketches).
For bfloat16/float16 input every pass reads ``A`` as stored, with float32
accumulation; the projection splits ``Q = Q_hi + Q_lo`` into two 16-bit halves so
``Aᵀ·Q`` keeps about 16 bits more than one 16-bit product would.

Orthonormalisation is Cholesky QR (``svdkernels.reference.cholqr``): one pass
between passes, shifted CholeskyQR3 (float64, float64, float32 Grams) for the final basis.

Beyond that plan (all in this driver, so every backend gets them):

- float64 input: the sketch and power passes in float32 (they only steer the
  subspace, as bfloat16 does for float32), the last range pass and the projection
  in float64, Householder QR for the bases and the SVD of the small ``B`` itself (not
  of its Gram, which would square the condition number): results in float64 with
  torch.svd_lowrank's accuracy (its own test cases pass at float64 tolerances).
- sparse ``A`` (COO 2-D/3-D, CSR 2-D/3-D): :class:`SparsePasses` multiplies CSR
  copies of ``A`` and ``Aᵀ`` (``O(nnz)`` memory, never densified), every pass in the
  working precision (float32 or float64).
- ``center``: the products with ``A − u·vᵀ`` (row or column means) computed as
  products with ``A`` minus a rank-one correction (:class:`ShiftedPasses`), so a
  sparse ``A`` stays sparse.
- ``method="krylov"``: block Krylov (Musco & Musco 2015). The same ``2·n_iter + 2``
  passes, but the basis keeps every block ``[AΩ, (AAᵀ)AΩ, …, (AAᵀ)^q AΩ]`` instead of
  only the last: error ``(1+ε)`` in ``O(log d/√ε)`` iterations against ``O(log d/ε)``.
  The final projection is ``(n_iter+1)`` times wider (more FLOPs, the same reads of ``A``).
- ``method="dash"``: dashSVD's shifted power iteration (Feng, Yu, Xie & Tang 2024,
  TOMS Alg. 1043): ``Q ← orth((A·Aᴴ − α·I)·Q)`` with a dynamic shift ``α`` (see
  :func:`_dash_basis`); the same passes and basis width as HMT, a lower error from
  the second iteration on.
- complex input (dense): every ``ᵀ`` is ``ᴴ`` (``.mH``, a no-op difference for real
  tensors), the test matrix is complex Gaussian, and the bases and the small SVD are
  as for float64 (Householder QR, direct SVD); all passes in the input's precision.
- ``tol``: dashSVD's accuracy control (Feng, Yu et al., TOMS Alg. 1043): stop the power
  iteration once the PVE-style change of the estimated spectrum,
  ``max_{i≤k} |σ_i(t)² − σ_i(t−1)²| / σ_{k+1}(t)²``, is below ``tol`` for every matrix
  of the batch (one host synchronisation per iteration).
- Scale: every orthonormalisation and the small eigenproblem scale their input by a
  power of two (exact), so ``A·1e-30`` and ``A·1e18`` give ``S`` scaled by 1e-30 and 1e18.
  Products that overflow float32 although ``A`` is finite are redone on ``A·2^-e``.
- A non-finite entry in ``A`` shows as a non-finite projection; the driver then
  raises ``ValueError`` naming ``A`` and the batch elements (no LAPACK
  "failed to converge" from deep inside).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch

from svdkernels.reference.cholqr import cholqr, cholqr3, unit_scale


class Passes(Protocol):
    """The products with ``A`` that a backend supplies (``A`` is ``[B, m, n]``).

    ``exact_16bit_products``: whether products of 16-bit operands come back with
    their float32 accumulator intact. ``torch.matmul`` rounds them to 16 bits,
    which the last two passes cannot afford, so there 16-bit input is upcast.
    """

    exact_16bit_products: bool

    def prepare(self, A: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``A`` as the operand of passes computed in ``dtype`` (may return ``A`` itself)."""
        ...

    def sketch(self, A: torch.Tensor, width: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
        """``[B, m, width]`` float32 (float64 for float64 passes) ``= A·Ω`` with ``Ω [B, n, width]`` i.i.d. N(0, 1).

        ``Ω`` is a function of ``seed`` alone (independent across batch elements),
        with operands rounded to ``dtype`` and float32 accumulation.
        """
        ...

    def matmul(
        self, A: torch.Tensor, X: torch.Tensor, *, transpose: bool, dtype: torch.dtype
    ) -> torch.Tensor:
        """``[B, m or n, w]`` float32 (float64 for float64 passes) ``= op(A)·X``, ``op(A) = Aᵀ`` if ``transpose``.

        ``X`` is ``[B, n or m, w]``; operands rounded to ``dtype``, float32 accumulation.
        """
        ...


class TorchPasses:
    """Passes with ``torch.matmul`` and a ``torch.Generator`` Gaussian."""

    # matmul of bf16/fp16 operands returns bf16/fp16 (and bmm has no out_dtype on the CPU).
    exact_16bit_products = False

    def prepare(self, A: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return A if A.dtype == dtype else A.to(dtype)

    def sketch(self, A: torch.Tensor, width: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
        omega = gaussian(A.shape[0], A.shape[-1], width, seed, A.device, dtype=complex_or_float32(A.dtype))
        return self.matmul(A, omega, transpose=False, dtype=dtype)

    def matmul(
        self, A: torch.Tensor, X: torch.Tensor, *, transpose: bool, dtype: torch.dtype
    ) -> torch.Tensor:
        A, X = A.to(dtype), X.to(dtype)
        # Aᴴ·X as (Xᴴ·A)ᴴ: BLAS streams A in its stored order, measured 1.3-1.5x
        # faster than a transposed-A product on the CPU for thin X. (ᴴ is ᵀ for real A.)
        out = (X.mH @ A).mH if transpose else A @ X
        return out if out.dtype not in (torch.float16, torch.bfloat16) else out.float()


TORCH_PASSES = TorchPasses()


@dataclass(frozen=True)
class PassSpec:
    """One product with ``A`` of width ``l`` (the bench times exactly these)."""

    transpose: bool  # Aᵀ·X rather than A·X
    dtype: torch.dtype  # operand precision (accumulation is float32)
    split: bool = False  # X split into two 16-bit halves: width 2·l


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 natively (tensor cores, AVX512-BF16/AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(probe is not None and torch.backends.mkldnn.is_available() and probe())
    return False


def working_dtype(dtype: torch.dtype, device: torch.device, sparse: bool = False) -> torch.dtype:
    """The dtype ``A`` is read in: its own, except float16 on the CPU (no fast fp16 GEMM
    there) and 16-bit sparse values (sparse 16-bit products are not faster)."""
    if dtype in (torch.float16, torch.bfloat16) and sparse:
        return torch.float32
    if dtype == torch.float16 and device.type == "cpu":
        return torch.float32
    return dtype


def default_sketch_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Operand dtype of the sketch and power passes when the caller gives none.

    float64 input steers its subspace in float32 (GEMMs twice as fast; the last
    range pass and the projection are float64, as for bfloat16 under float32).
    """
    if dtype == torch.float32 and native_bf16(device):
        return torch.bfloat16
    if dtype == torch.float64:
        return torch.float32
    return dtype


def plan_passes(
    dtype: torch.dtype, n_iter: int, sketch_dtype: torch.dtype, exact_16bit_products: bool = True
) -> list[PassSpec]:
    """The ``2·n_iter + 2`` passes for ``A`` read in ``dtype`` (see the module docstring).

    The last range pass and the projection need float32 results; a backend whose
    16-bit products are rounded (``exact_16bit_products=False``) does them in float32.
    """
    low = [PassSpec(transpose=i % 2 == 1, dtype=sketch_dtype) for i in range(2 * n_iter)]
    # float32/float64 products are exact whatever the backend; 16-bit ones may not be.
    precise = dtype if exact_16bit_products or dtype.itemsize >= 4 else torch.float32
    split = precise.itemsize == 2
    return low + [PassSpec(False, precise), PassSpec(True, precise, split=split)]


def _split_halves(X: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, r, w]`` float32 -> ``[B, r, 2w]``: ``X ≈ hi + lo`` with both halves in ``dtype``."""
    hi = X.to(dtype)
    lo = (X - hi.float()).to(dtype)
    return torch.cat([hi, lo], dim=-1)


# --------------------------------------------------------------------------- sparse A

SPARSE_LAYOUTS = (torch.sparse_coo, torch.sparse_csr)


def _csr(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    # The indices are built here, sorted by construction: skip torch's invariant checks.
    return torch.sparse_csr_tensor(crow, col, val, shape, check_invariants=False)


def _crow(rows: torch.Tensor, m: int) -> torch.Tensor:
    """CSR row pointers ``[m + 1]`` of sorted row indices."""
    crow = torch.zeros(m + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=m).cumsum(0)
    return crow


def sparse_matrices(A: torch.Tensor) -> list[torch.Tensor]:
    """The ``[m, n]`` matrices of a sparse ``A [m, n]`` or ``[B, m, n]`` (COO or CSR), as CSR.

    ``O(nnz)`` copies; nothing is densified. A coalesced COO matrix is already sorted
    by row, so its CSR form is its column indices and values plus row pointers. A
    batched CSR tensor (torch requires the same number of non-zeros per matrix) is
    split through its index tensors.
    """
    m, n = A.shape[-2:]
    if A.layout == torch.sparse_coo:
        A = A.coalesce()
        idx, val = A.indices(), A.values()
        if A.dim() == 2:
            return [_csr(_crow(idx[0], m), idx[1], val, (m, n))]
        starts = _crow(idx[0], A.shape[0])  # entries are sorted by batch, then row
        return [
            _csr(_crow(idx[1, s:e], m), idx[2, s:e], val[s:e], (m, n))
            for s, e in zip(starts[:-1].tolist(), starts[1:].tolist())
        ]
    if A.dim() == 2:
        return [A]
    crow, col, val = A.crow_indices(), A.col_indices(), A.values()
    return [_csr(crow[b], col[b], val[b], (m, n)) for b in range(A.shape[0])]


def csr_transpose(M: torch.Tensor) -> torch.Tensor:
    """``Mᵀ`` as CSR for a CSR ``M [m, n]``: a stable sort of the column indices.

    torch's ``M.t().to_sparse_csr()`` goes through CSC and was measured 8x slower
    (2.5 s for 5M non-zeros on this CPU); this is the textbook counting transpose.
    """
    m, n = M.shape
    crow, col, val = M.crow_indices(), M.col_indices(), M.values()
    rows = torch.repeat_interleave(torch.arange(m, device=col.device), crow.diff())
    order = torch.argsort(col, stable=True)  # within a column, rows stay ascending
    # index_select: 3x faster than x[order] for these 1-D gathers (measured).
    take = lambda t: t.index_select(0, order)  # noqa: E731
    return _csr(_crow(take(col), n), take(rows), take(val), (n, m))


@dataclass(frozen=True)
class SparseOperand:
    """A sparse ``A [B, m, n]`` prepared for the passes: CSR copies of every ``A_b`` and ``A_bᵀ``."""

    mats: tuple[torch.Tensor, ...]  # B x CSR [m, n]
    mats_t: tuple[torch.Tensor, ...]  # B x CSR [n, m]
    shape: tuple[int, int, int]  # (B, m, n)
    device: torch.device


class SparsePasses:
    """Passes over a sparse ``A`` (COO or CSR, 2-D or batched 3-D): CSR times dense.

    ``Aᵀ`` is kept as a CSR copy of its own (``O(nnz)``): on the CPU a CSR product
    (MKL/OpenMP) is several times faster than the COO one, and CSRᵀ·X has no fast
    kernel. Products are in the values' dtype (float32 or float64), never 16-bit.
    """

    exact_16bit_products = True  # no 16-bit products are ever made

    def prepare(self, A: torch.Tensor, dtype: torch.dtype) -> SparseOperand:
        with warnings.catch_warnings():  # torch's "CSR support is in beta", once per call
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            mats = [M.to(dtype) for M in sparse_matrices(A)]
            mats_t = [csr_transpose(M) for M in mats]
        m, n = A.shape[-2:]
        return SparseOperand(tuple(mats), tuple(mats_t), (len(mats), m, n), A.device)

    def sketch(self, A: SparseOperand, width: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
        return self.matmul(A, gaussian(A.shape[0], A.shape[2], width, seed, A.device), transpose=False, dtype=dtype)

    def matmul(self, A: SparseOperand, X: torch.Tensor, *, transpose: bool, dtype: torch.dtype) -> torch.Tensor:
        mats = A.mats_t if transpose else A.mats
        X = X.to(mats[0].dtype)
        return torch.stack([M @ x for M, x in zip(mats, X.unbind(0))])


SPARSE_PASSES = SparsePasses()


def gaussian(
    batch: int, n: int, width: int, seed: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``Ω [batch, n, width]`` i.i.d. N(0, 1) (float32; complex: CN(0, 1) in ``dtype``), a
    function of ``seed``: the test matrix of :class:`TorchPasses` (and of
    :class:`SparsePasses`, :class:`ShiftedPasses`)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(batch, n, width, generator=g, device=device, dtype=dtype)


def complex_or_float32(dtype: torch.dtype) -> torch.dtype:
    """The test matrix's dtype for ``A`` of ``dtype``: complex Gaussian for complex ``A``."""
    return dtype if dtype.is_complex else torch.float32


# --------------------------------------------------------------------------- A − u·vᵀ


class ShiftedPasses:
    """Passes over ``A − u·vᵀ`` (``u [B, m]``, ``v [B, n]``) through passes over ``A``.

    ``(A − u·vᵀ)·X = A·X − u·(vᵀX)`` and ``(A − u·vᵀ)ᵀ·X = AᵀX − v·(uᵀX)``: the centred
    matrix is never formed, so a sparse ``A`` stays sparse (torch.svd_lowrank's ``M``,
    torch.pca_lowrank's centring). The correction is in the products' dtype.
    """

    def __init__(self, inner: Any, u: torch.Tensor, v: torch.Tensor) -> None:
        self.inner, self.u, self.v = inner, u, v
        self.exact_16bit_products = inner.exact_16bit_products

    def prepare(self, A: Any, dtype: torch.dtype) -> Any:
        return self.inner.prepare(A, dtype)

    def sketch(self, A: Any, width: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
        B, n = self.v.shape
        omega = gaussian(B, n, width, seed, self.v.device, dtype=complex_or_float32(self.v.dtype))
        return self.matmul(A, omega, transpose=False, dtype=dtype)

    def matmul(self, A: Any, X: torch.Tensor, *, transpose: bool, dtype: torch.dtype) -> torch.Tensor:
        out = self.inner.matmul(A, X, transpose=transpose, dtype=dtype)
        # (A − u·vᵀ)ᴴ·X = AᴴX − v̄·(ūᵀX); conj() is a no-op view for real u, v.
        left, right = (self.v.conj(), self.u.conj()) if transpose else (self.u, self.v)
        X = X.to(out.dtype)
        return out - left.to(out.dtype).unsqueeze(-1) * (right.to(out.dtype).unsqueeze(-2) @ X)


def center_vectors(
    passes: Any, operand: Any, B: int, m: int, n: int, center: str, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u [B, m], v [B, n])`` with ``A − u·vᵀ`` the centred ``A``, means from one thin pass.

    ``"columns"``: each column's mean removed (``v = Aᵀ·1/m``, ``u = 1``), PCA with samples
    as rows; ``"rows"``: each row's mean (``u = A·1/n``, ``v = 1``).
    """
    real = torch.float64 if dtype == torch.float64 else torch.float32
    if center == "columns":
        ones = torch.ones(B, m, 1, dtype=real, device=device)
        # Aᴴ·1 is the conjugate of the column sums for complex A.
        v = passes.matmul(operand, ones, transpose=True, dtype=dtype)[..., 0].conj() / m
        return torch.ones(B, m, dtype=v.dtype, device=device), v
    ones = torch.ones(B, n, 1, dtype=real, device=device)
    u = passes.matmul(operand, ones, transpose=False, dtype=dtype)[..., 0] / n
    return u, torch.ones(B, n, dtype=u.dtype, device=device)


# --------------------------------------------------------------------------- driver


def _exact_svd(A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    real = torch.float64 if A.dtype == torch.float64 else torch.float32
    U, S, Vh = torch.linalg.svd(A if A.is_complex() else A.to(real), full_matrices=False)
    return U[..., :rank], S[..., :rank], Vh[..., :rank, :]


def _householder(Y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis by Householder QR (the float64 path: torch.svd_lowrank's accuracy)."""
    return torch.linalg.qr(Y).Q


def check_finite(A: torch.Tensor, what: str = "A") -> None:
    """Raise ``ValueError`` naming ``A`` (and the bad batch elements) if it has a NaN or Inf."""
    if A.layout != torch.strided:
        vals = A.values()
        if not bool(torch.isfinite(vals).all()):
            raise ValueError(f"{what}: expected finite entries, got NaN or Inf among the stored values of the sparse matrix")
        return
    A3 = A.reshape(-1, *A.shape[-2:])
    bad = ~torch.isfinite(A3).all(dim=(-2, -1))
    if bool(bad.any()):
        idx = bad.nonzero().flatten().tolist()
        where = f" in batch element(s) {idx[:8]}{'...' if len(idx) > 8 else ''} (flattened)" if A.dim() > 2 else ""
        raise ValueError(f"{what}: expected finite entries, got NaN or Inf{where}")


def _spectrum_estimate(Y: torch.Tensor) -> torch.Tensor:
    """``[B, l]`` descending singular values of ``Y`` (through its scaled float64 Gram)."""
    c = unit_scale(Y)
    Ys = (Y * c).to(torch.complex128 if Y.is_complex() else torch.float64)
    lam = torch.linalg.eigvalsh(torch.nan_to_num(Ys.mH @ Ys)).flip(-1).clamp_min(0).sqrt()
    return lam / c.flatten(1).double()


def _converged(prev: torch.Tensor, cur: torch.Tensor, rank: int, tol: float) -> bool:
    """dashSVD's PVE-style stop: ``max_{i≤k} |σ_i(t)² − σ_i(t−1)²| ≤ tol·σ_{k+1}(t)²`` everywhere.

    With no oversampling ``σ_{k+1}`` is not estimated and ``σ_k`` stands in for it.
    """
    ref = cur[..., min(rank, cur.shape[-1] - 1)]
    change = (cur[..., :rank] ** 2 - prev[..., :rank] ** 2).abs().amax(-1)
    return bool((change <= tol * ref**2).all())


def rsvd(
    A: torch.Tensor,
    rank: int,
    *,
    oversample: int = 10,
    n_iter: int = 2,
    seed: int = 0,
    sketch_dtype: torch.dtype | None = None,
    passes: Passes = TORCH_PASSES,
    center: Optional[str] = None,
    shift: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    method: str = "hmt",
    tol: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized SVD of ``A [..., m, n]`` (inputs already validated by the op).

    ``A`` may be sparse (COO ``[m, n]``/``[B, m, n]``, CSR ``[m, n]``/``[B, m, n]``): then
    :class:`SparsePasses` replaces ``passes``. ``center`` (``"columns"``/``"rows"``) or
    ``shift = (u [..., m], v [..., n])`` factor ``A − u·vᵀ`` instead, implicitly.
    ``method``: ``"hmt"`` (subspace iteration) or ``"krylov"`` (block Krylov, same
    passes). ``tol``: stop the power iteration early (dashSVD's PVE criterion);
    ``n_iter`` is then the maximum.

    Returns ``U [..., m, rank]``, ``S [..., rank]`` (descending), ``Vh [..., rank, n]``,
    float64 for float64 ``A``, else float32. ``rank + oversample >= min(m, n)``
    computes an exact SVD instead (dense ``A``; a sparse ``A`` gets a full-width sketch).
    """
    *batch, m, n = A.shape
    sparse = A.layout != torch.strided
    real = torch.float64 if A.dtype in (torch.float64, torch.complex128) else torch.float32
    # float64 and complex input: Householder QR and a direct SVD of the small matrix.
    householder = A.dtype == torch.float64 or A.is_complex()
    vectors = A.dtype if A.is_complex() else real  # dtype of U and Vh
    B = math.prod(batch)
    if B == 0:  # empty batch
        return (
            torch.empty(*batch, m, rank, dtype=vectors, device=A.device),
            torch.empty(*batch, rank, dtype=real, device=A.device),
            torch.empty(*batch, rank, n, dtype=vectors, device=A.device),
        )
    if shift is not None:
        shift = (shift[0].expand(*batch, m).reshape(B, m), shift[1].expand(*batch, n).reshape(B, n))
    krylov, dash = method == "krylov", method == "dash"
    width = rank + oversample
    basis_cols = width * (n_iter + 1) if krylov else width
    if not sparse and basis_cols >= min(m, n):
        A3 = A.reshape(B, m, n)
        check_finite(A3)
        if center is not None:
            A3 = A3 - (A3.mean(-2, keepdim=True) if center == "columns" else A3.mean(-1, keepdim=True))
        elif shift is not None:
            A3 = A3 - shift[0].unsqueeze(-1) * shift[1].unsqueeze(-2)
        U, S, Vh = _exact_svd(A3, rank)
        return U.reshape(*batch, m, rank), S.reshape(*batch, rank), Vh.reshape(*batch, rank, n)
    # Sparse: a sketch as wide as the matrix spans its range exactly, so no dense fallback.
    width = min(width, m, n)
    if krylov:  # at most min(m, n) basis columns
        n_iter = max(0, min(n_iter, min(m, n) // width - 1))
    if sparse:
        passes = SPARSE_PASSES
    dtype = working_dtype(A.dtype, A.device, sparse)
    if sparse or krylov or dash or tol is not None or A.is_complex():
        # Every block of a Krylov basis enters the result, dash's shift subtracts two
        # products that are not re-orthonormalised in between, and an early stop may
        # come after any pass: all passes read A in its working precision.
        sketch_dtype = dtype
    elif sketch_dtype is None:
        sketch_dtype = default_sketch_dtype(dtype, A.device)
    plan = plan_passes(dtype, n_iter, sketch_dtype, passes.exact_16bit_products)

    A3 = A if sparse else A.reshape(B, m, n)
    # One operand per distinct dtype: prepare may copy all of A.
    operands = {d: passes.prepare(A3, d) for d in {spec.dtype for spec in plan}}
    if center is not None:
        shift = center_vectors(passes, operands[plan[-1].dtype], B, m, n, center, plan[-1].dtype, A.device)
    if shift is not None:
        passes = ShiftedPasses(passes, *shift)

    def run(spec: PassSpec, X: torch.Tensor) -> torch.Tensor:
        op = operands[spec.dtype]
        if spec.split:
            w = X.shape[-1]
            out = passes.matmul(op, _split_halves(X, spec.dtype), transpose=spec.transpose, dtype=spec.dtype)
            return out[..., :w] + out[..., w:]
        return passes.matmul(op, X, transpose=spec.transpose, dtype=spec.dtype)

    def orth_step(Y: torch.Tensor, spec: PassSpec) -> torch.Tensor:
        # The bases between passes only steer the subspace, so one Cholesky QR pass
        # with a float32 Gram is enough: the span is kept exactly even where the basis
        # stays ill-conditioned. The exception is the basis of a 16-bit last range pass
        # (backends with exact 16-bit products): rounding it to 16 bits keeps only the
        # directions a well-conditioned basis carries, so its Gram is float64.
        if householder:
            return _householder(Y)
        exact_basis = spec is plan[2 * n_iter] and spec.dtype != torch.float32
        return cholqr(Y, gram_dtype=torch.float64 if exact_basis else torch.float32)

    orth_final: Callable[[torch.Tensor], torch.Tensor] = _householder if householder else cholqr3

    # Range finder: the sketch, then power passes AᵀQ and A·Z alternately.
    Y = passes.sketch(operands[plan[0].dtype], width, seed, plan[0].dtype)
    if krylov:
        Q = _krylov_basis(Y, n_iter, plan, run, orth_step, orth_final)
    elif dash:
        Q = _dash_basis(Y, n_iter, plan, run, orth_final, rank, tol)
    else:
        estimate = None
        for it in range(n_iter):
            Z = run(plan[2 * it + 1], orth_step(Y, plan[2 * it + 1]))
            Y = run(plan[2 * it + 2], orth_step(Z, plan[2 * it + 2]))
            if tol is not None and it < n_iter - 1:
                # Y = A·Z with Z orthonormal: its singular values estimate A's.
                previous, estimate = estimate, _spectrum_estimate(Y)
                if previous is not None and _converged(previous, estimate, rank, tol):
                    break
        Q = orth_final(Y)

    # Projection Bᵀ = AᵀQ, then the SVD of the small B.
    Bt = run(plan[-1], Q)
    if not bool(torch.isfinite(Bt).all()):
        # One host synchronisation (eigh has one anyway). A non-finite A is the
        # caller's error; products that overflowed a finite A are redone scaled.
        check_finite(A)
        return _rescaled(A, rank, oversample=oversample, n_iter=n_iter, seed=seed, sketch_dtype=sketch_dtype,
                         passes=passes if not isinstance(passes, ShiftedPasses) else passes.inner,
                         center=center, shift=shift, method=method, tol=tol, batch=batch)
    if householder:
        # Bᴴ = Ub·Sb·Vbh, so A ≈ Q·B = (Q·Vbhᴴ)·Sb·Ubᴴ.
        Ub, Sb, Vbh = torch.linalg.svd(Bt, full_matrices=False)
        U = Q @ Vbh.mH[..., :rank]
        S = Sb[..., :rank]
        V = Ub[..., :rank]
    else:
        U, S, V = _small_svd_by_gram(Q, Bt, rank)
    return (
        U.reshape(*batch, m, rank),
        S.reshape(*batch, rank),
        V.mH.reshape(*batch, rank, n),
    )


def _small_svd_by_gram(Q: torch.Tensor, Bt: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, S, V`` float32 of ``Q·Bᵀᵀ`` from the eigendecomposition of the ``l×l`` Gram of ``Bᵀ``.

    The Gram is of ``Bᵀ`` scaled by a power of two (exact) and in float64, so the
    spectrum is exact for the float32 ``Bᵀ`` we hold whatever its magnitude.
    """
    c = unit_scale(Bt)  # [B, 1, 1]
    Bs = Bt * c
    Btd = Bs.double()
    # torch.linalg.eigh has no _ex variant: on CUDA its error check is the one host
    # synchronisation left per call (Cholesky uses cholesky_ex). A batched Jacobi
    # kernel for these l×l matrices would remove it.
    lam, W = torch.linalg.eigh(Btd.mT @ Btd)  # ascending
    W = W.flip(-1)[..., :rank]
    Ss = lam.flip(-1)[..., :rank].clamp_min(0).sqrt()
    U = Q @ W.float()
    # V = Bᵀ·W·Σ⁻¹ in float32 is orthonormal only to u·σ₁/σ_k, which is no
    # orthonormality at all once σ_k is rounding noise (A dominated by one direction:
    # rows of Vh of norm ~100 came out of one float32 pass). Shifted CholeskyQR3 on this
    # thin n×k matrix restores it whatever σ₁/σ_k (cheaper on the CPU than the product
    # in float64). Exactly zero σ (rank-deficient A) would divide by zero: those
    # columns are left zero.
    inv = torch.where(Ss > 0, Ss.reciprocal(), torch.zeros_like(Ss))
    V = cholqr3(Bs @ (W * inv.unsqueeze(-2)).float())
    S = (Ss / c.flatten(1).double()).float()
    return U, S, V


def _krylov_basis(
    Y: torch.Tensor,
    n_iter: int,
    plan: list[PassSpec],
    run: Callable[[PassSpec, torch.Tensor], torch.Tensor],
    orth_step: Callable[[torch.Tensor, PassSpec], torch.Tensor],
    orth_final: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``[B, m, (n_iter+1)·l]`` orthonormal basis of the block Krylov space of ``Y = A·Ω``.

    Musco & Musco (2015), Alg. 2: ``K = [AΩ, (AAᵀ)AΩ, …, (AAᵀ)^q AΩ]``. Each new block
    is orthogonalised against the earlier ones (block Gram–Schmidt, twice: once loses
    orthogonality when the blocks are nearly parallel, which they become as the
    iteration converges) before it is orthonormalised, so the blocks together are
    an orthonormal basis of ``K``; the span is that of ``K`` (block Lanczos).
    """
    blocks = [orth_final(Y)]
    for it in range(n_iter):
        Z = run(plan[2 * it + 1], blocks[-1])
        Y = run(plan[2 * it + 2], orth_step(Z, plan[2 * it + 1]))
        K = torch.cat(blocks, dim=-1)
        for _ in range(2):
            Y = Y - K @ (K.mH @ Y)
            Y = orth_final(Y)
        blocks.append(Y)
    return torch.cat(blocks, dim=-1)


def _dash_basis(
    Y: torch.Tensor,
    n_iter: int,
    plan: list[PassSpec],
    run: Callable[[PassSpec, torch.Tensor], torch.Tensor],
    orth_final: Callable[[torch.Tensor], torch.Tensor],
    rank: int,
    tol: Optional[float],
) -> torch.Tensor:
    """``[B, m, l]`` orthonormal basis by dashSVD's shifted power iteration.

    Feng, Yu, Xie & Tang (2024), "Algorithm 1043: Faster randomized SVD with dynamic
    shifts" (TOMS), Alg. 3: ``Q ← orth((A·Aᴴ − α·I)·Q)`` with the shift updated from the
    smallest singular value ``ŝ_l`` of the shifted product, ``α ← (α + ŝ_l)/2`` when
    ``ŝ_l > α``. ``A·Aᴴ − αI`` has eigenvalues ``σ_i² − α``: the convergence ratio
    ``(σ_{l+1}² − α)/(σ_k² − α)`` is below subspace iteration's ``σ_{l+1}²/σ_k²``, and
    ``α`` stays below ``σ_l²/2`` so no tail eigenvalue ``|0 − α|`` overtakes it. Each step is
    the same two passes over ``A`` as one HMT iteration (one orthonormalisation, not two).
    The paper orthonormalises with eigSVD; here the same span comes from Cholesky QR2
    (Householder for float64/complex) and ``ŝ`` from the float64 Gram of the product.

    ``tol``: dashSVD's PVE-style stop on the estimates ``σ_i² ≈ ŝ_i + α``.
    """
    Q = orth_final(Y)
    alpha = torch.zeros(Y.shape[0], dtype=torch.float64, device=Y.device)
    estimate = None
    for it in range(n_iter):
        Z = run(plan[2 * it + 1], Q)  # AᴴQ
        # c = 2^-e keeps A·Aᴴ·Q (of size σ₁²) in range; exact, undone below.
        c = unit_scale(Z)
        X = run(plan[2 * it + 2], Z * c) - (alpha.view(-1, 1, 1) * c.double()).to(Q.real.dtype) * Q
        s = _spectrum_estimate(X) / c.flatten(1).double()  # [B, l] ≈ |σ_i² − α|, descending
        Q = orth_final(X)
        if tol is not None and it < n_iter - 1:
            previous, estimate = estimate, (s + alpha.unsqueeze(-1)).clamp_min(0).sqrt()
            if previous is not None and _converged(previous, estimate, rank, tol):
                break
        s_l = s[..., -1]
        alpha = torch.where(s_l > alpha, (alpha + s_l) / 2, alpha)
    return Q


def _rescaled(A: torch.Tensor, rank: int, *, batch: list[int], **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rerun on ``A·2^-e`` (``max |A|·2^-e`` in [0.5, 1)): products of a finite ``A`` overflowed.

    Only reached for entries near the dtype's maximum; the copy of ``A`` is the price.
    """
    if A.layout != torch.strided:
        amax = A.values().abs().amax().reshape(1, 1, 1)
        c = unit_scale(amax)
        As = A * c.flatten()[0]
        c = c.expand(max(math.prod(batch), 1), 1, 1)
    else:
        A3 = A.reshape(-1, *A.shape[-2:])
        c = unit_scale(A3.float() if A3.dtype.itemsize == 2 else A3)
        As = (A3 * c.to(A3.dtype)).reshape(A.shape)
    shift = kwargs.pop("shift")
    if kwargs["center"] is not None:
        shift = None  # recomputed from the scaled A
    elif shift is not None:
        shift = (shift[0] * c.flatten(1).to(shift[0].dtype), shift[1])
    U, S, Vh = rsvd(As, rank, shift=shift, **kwargs)
    return U, (S.double() / c.flatten(1).double().reshape(*batch, 1)).to(S.dtype), Vh
