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
between passes, CholeskyQR2 (float64 then float32 Gram) for the final basis.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from svdkernels.reference.cholqr import cholqr, cholqr2


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
        """``[B, m, width]`` float32 ``= A·Ω`` with ``Ω [B, n, width]`` i.i.d. N(0, 1).

        ``Ω`` is a function of ``seed`` alone (independent across batch elements),
        with operands rounded to ``dtype`` and float32 accumulation.
        """
        ...

    def matmul(
        self, A: torch.Tensor, X: torch.Tensor, *, transpose: bool, dtype: torch.dtype
    ) -> torch.Tensor:
        """``[B, m or n, w]`` float32 ``= op(A)·X``, ``op(A) = Aᵀ`` if ``transpose``.

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
        g = torch.Generator(device=A.device).manual_seed(seed)
        omega = torch.randn(A.shape[0], A.shape[-1], width, generator=g, device=A.device)
        return self.matmul(A, omega, transpose=False, dtype=dtype)

    def matmul(
        self, A: torch.Tensor, X: torch.Tensor, *, transpose: bool, dtype: torch.dtype
    ) -> torch.Tensor:
        A, X = A.to(dtype), X.to(dtype)
        # Aᵀ·X as (Xᵀ·A)ᵀ: BLAS streams A in its stored order, measured 1.3-1.5x
        # faster than a transposed-A product on the CPU for thin X.
        out = (X.mT @ A).mT if transpose else A @ X
        return out if out.dtype == torch.float32 else out.float()


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


def working_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype ``A`` is read in: its own, except float16 on the CPU (no fast fp16 GEMM there)."""
    if dtype == torch.float16 and device.type == "cpu":
        return torch.float32
    return dtype


def default_sketch_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Operand dtype of the sketch and power passes when the caller gives none."""
    if dtype == torch.float32 and native_bf16(device):
        return torch.bfloat16
    return dtype


def plan_passes(
    dtype: torch.dtype, n_iter: int, sketch_dtype: torch.dtype, exact_16bit_products: bool = True
) -> list[PassSpec]:
    """The ``2·n_iter + 2`` passes for ``A`` read in ``dtype`` (see the module docstring).

    The last range pass and the projection need float32 results; a backend whose
    16-bit products are rounded (``exact_16bit_products=False``) does them in float32.
    """
    low = [PassSpec(transpose=i % 2 == 1, dtype=sketch_dtype) for i in range(2 * n_iter)]
    precise = dtype if exact_16bit_products else torch.float32
    split = precise != torch.float32
    return low + [PassSpec(False, precise), PassSpec(True, precise, split=split)]


def _split_halves(X: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, r, w]`` float32 -> ``[B, r, 2w]``: ``X ≈ hi + lo`` with both halves in ``dtype``."""
    hi = X.to(dtype)
    lo = (X - hi.float()).to(dtype)
    return torch.cat([hi, lo], dim=-1)


def _exact_svd(A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(A.float(), full_matrices=False)
    return U[..., :rank], S[..., :rank], Vh[..., :rank, :]


def rsvd(
    A: torch.Tensor,
    rank: int,
    *,
    oversample: int = 10,
    n_iter: int = 2,
    seed: int = 0,
    sketch_dtype: torch.dtype | None = None,
    passes: Passes = TORCH_PASSES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized SVD of ``A [..., m, n]`` (inputs already validated by the op).

    Returns ``U [..., m, rank]``, ``S [..., rank]`` (descending), ``Vh [..., rank, n]``,
    all float32. ``rank + oversample >= min(m, n)`` computes an exact SVD instead.
    """
    *batch, m, n = A.shape
    width = rank + oversample
    if width >= min(m, n):
        return _exact_svd(A, rank)
    if A.numel() == 0:  # empty batch
        empty = A.new_empty
        return (
            empty(*batch, m, rank, dtype=torch.float32),
            empty(*batch, rank, dtype=torch.float32),
            empty(*batch, rank, n, dtype=torch.float32),
        )
    dtype = working_dtype(A.dtype, A.device)
    if sketch_dtype is None:
        sketch_dtype = default_sketch_dtype(dtype, A.device)
    plan = plan_passes(dtype, n_iter, sketch_dtype, passes.exact_16bit_products)

    A3 = A.reshape(-1, m, n)
    # One operand per distinct dtype: prepare may copy all of A.
    operands = {dtype: passes.prepare(A3, dtype) for dtype in {spec.dtype for spec in plan}}

    def run(i: int, X: torch.Tensor) -> torch.Tensor:
        spec = plan[i]
        op = operands[spec.dtype]
        if spec.split:
            out = passes.matmul(op, _split_halves(X, spec.dtype), transpose=spec.transpose, dtype=spec.dtype)
            return out[..., :width] + out[..., width:]
        return passes.matmul(op, X, transpose=spec.transpose, dtype=spec.dtype)

    # Range finder: the sketch, then power passes A^T·Q and A·Z alternately. The
    # bases between passes only steer the subspace, so one Cholesky QR pass with a
    # float32 Gram is enough: the span is kept exactly even where the basis stays
    # ill-conditioned. The exception is the basis of a 16-bit last range pass
    # (backends with exact 16-bit products): rounding it to 16 bits keeps only the
    # directions a well-conditioned basis carries, so its Gram is float64.
    Y = passes.sketch(operands[plan[0].dtype], width, seed, plan[0].dtype)
    for i in range(1, 2 * n_iter + 1):
        exact_basis = i == 2 * n_iter and plan[i].dtype != torch.float32
        Y = run(i, cholqr(Y, gram_dtype=torch.float64 if exact_basis else torch.float32))
    Q = cholqr2(Y)

    # Projection Bᵀ = AᵀQ and the SVD of the small B through its l×l Gram B·Bᵀ
    # (float64, so the spectrum is exact for the float32 Bᵀ we hold).
    Bt = run(2 * n_iter + 1, Q)
    Btd = Bt.double()
    # torch.linalg.eigh has no _ex variant: on CUDA its error check is the one host
    # synchronisation left per call (Cholesky uses cholesky_ex). A batched Jacobi
    # kernel for these l×l matrices would remove it.
    lam, W = torch.linalg.eigh(Btd.mT @ Btd)  # ascending
    W = W.flip(-1)[..., :rank]
    S = lam.flip(-1)[..., :rank].clamp_min(0).sqrt()
    U = Q @ W.float()
    # V = Bᵀ·W·Σ⁻¹ in float32 is orthonormal only to u·σ₁/σ_k; one float32 Cholesky
    # QR pass on this nearly orthonormal matrix restores it (cheaper on the CPU than
    # the product in float64). Exactly zero σ (rank-deficient A) would divide by
    # zero: those columns are left zero.
    inv = torch.where(S > 0, S.reciprocal(), torch.zeros_like(S))
    V = cholqr(Bt @ (W * inv.unsqueeze(-2)).float(), gram_dtype=torch.float32)
    return (
        U.reshape(*batch, m, rank),
        S.float().reshape(*batch, rank),
        V.mT.reshape(*batch, rank, n),
    )
