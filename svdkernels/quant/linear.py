"""``LowRankQuantLinear``: an SVDQuant linear layer (Li et al. 2024, "SVDQuant:
Absorbing Outliers by Low-Rank Components for 4-Bit Diffusion Models"; the
Nunchaku inference engine).

A float weight ``W [N, K]`` (``out_features x in_features``) is kept as

    W·diag(λ) = Ŵ ≈ L̂ + R̂,   L̂ = L_up·L_down·diag(λ) of rank r (16-bit),   R̂ in int4,

with per-input-channel smoothing factors ``λ [K]`` that move activation outliers
into the weight, where the low-rank branch absorbs them. The layer computes

- W4A4 (``acts="int4"``): ``y = deq(Q(x/λ))·deq(R̂)ᵀ + (x·L_downᵀ)·L_upᵀ + bias``
  through :func:`svdkernels.quant.lowrank_w4a4_linear` (bit for bit
  :func:`~svdkernels.quant.lowrank_quantize_act` then
  :func:`~svdkernels.quant.lowrank_w4a4_gemm`, one call); ``L_down`` holds ``1/λ`` folded in,
  so the down projection reads the unsmoothed ``x``. With ``unsigned=True``
  (inputs ``>= -0.171875``, e.g. after a GELU) the activations are quantised to
  unsigned int4 after a shift and ``bias`` is the compensated one
  (:func:`svdkernels.quant.compensate_unsigned_bias`).
- W4A16 (``acts=None``): ``y = x·deq(R)ᵀ + (x·L_downᵀ)·L_upᵀ + bias`` through
  :func:`svdkernels.quant.lowrank_w4a16_linear`, one call, no pass over ``x`` before
  it. The op has no smoothing input, so here ``λ`` only steers the low-rank branch
  (the SVD of ``W·diag(λ)``: activation-aware directions) and the residual
  ``R = W − L_up·L_down`` is quantised unsmoothed; ``smooth`` is kept for the record.

Weights are int4 with one scale per group of 64 along ``K``
(``svdkernels/formats/int4.py``), so ``K`` must be a multiple of 64 and the rank
a multiple of 16 (0 allowed: plain round-to-nearest int4).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import nn

from svdkernels.errors import strict_kwargs
from svdkernels.ops.lowrank_quant import (
    RANK_MULTIPLE,
    lowrank_w4a4_linear,
    lowrank_w4a16_linear,
    validate_quantize_act,
    validate_w4a16,
)
from svdkernels.ops.rsvd import rsvd
from svdkernels.formats.int4 import (
    check_float,
    check_group_dim,
    check_tensor,
    compensate_unsigned_bias,
    dequantize_weight,
    quantize_weight,
)

ACTS = ("int4", None)
"""Activation formats: ``"int4"`` (W4A4) or ``None`` (16-bit activations, W4A16)."""

WEIGHTS = ("int4",)
"""Weight formats (NVFP4 is not implemented)."""

DEFAULT_REFINE_ITERS = 3
"""Iterations of ``L ← SVD_r(Ŵ − Q(Ŵ − L))`` (measured in ``svdkernels/quant/model.py``)."""

__all__ = [
    "ACTS",
    "DEFAULT_REFINE_ITERS",
    "WEIGHTS",
    "Decomposition",
    "LowRankQuantLinear",
    "check_acts",
    "check_rank",
    "decompose",
]


def check_acts(acts: object) -> None:
    """``ValueError`` unless ``acts`` is one of :data:`ACTS`."""
    if acts not in ACTS:
        raise ValueError(f"acts: expected 'int4' or None, got {acts!r}")


def check_rank(rank: object, N: Optional[int] = None, K: Optional[int] = None, where: str = "") -> int:
    """``rank`` if it is an int and a non-negative multiple of 16 (and, given the
    layer's ``N x K``, at most ``min(N, K)``); else ``TypeError``/``ValueError``
    naming ``rank`` (and ``where``, a layer name)."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank: expected an int, got {type(rank).__name__}")
    if rank < 0 or rank % RANK_MULTIPLE:
        raise ValueError(f"rank: expected a non-negative multiple of {RANK_MULTIPLE}, got {rank}")
    if N is not None and K is not None and rank > min(N, K):
        at = f" for layer {where!r}" if where else ""
        raise ValueError(
            f"rank: expected at most min(out_features, in_features) = {min(N, K)}{at} "
            f"(weight [{N}, {K}]), got {rank}"
        )
    return rank


def _check_seed(seed: object) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**62:  # decompose adds the refinement index to it
        raise ValueError(f"seed: expected an int in [0, 2**62), got {seed}")


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: expected finite values, got a NaN or infinity")


# ---------------------------------------------------------------------------
# The decomposition (batched over candidate smoothing factors)


def _quant_dequant(M: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Int4 round trip of ``M [B, N, K]`` (float32) with scales in ``dtype``:
    ``(qweight [B, N, K/2], scales [B, N, K/64], deq(M) [B, N, K] float32)``."""
    B, N, K = M.shape
    # Groups run along K within a row, so the B weights quantise as one [B·N, K] matrix.
    q, s = quantize_weight(M.reshape(B * N, K), dtype=dtype)
    deq = dequantize_weight(q, s, dtype=torch.float32)
    return q.reshape(B, N, K // 2), s.reshape(B, N, -1), deq.reshape(B, N, K)


class Decomposition(NamedTuple):
    """:func:`decompose`'s result for ``B`` candidates (compute dtype but ``qweight``)."""

    qweight: torch.Tensor  # [B, N, K/2] uint8
    scales: torch.Tensor  # [B, N, K/64]
    L_down: torch.Tensor  # [B, r, K], holding 1/λ
    L_up: torch.Tensor  # [B, N, r]
    weight_error: torch.Tensor  # [B] float32, ‖Ŵ − L̂ − Q(Ŵ − L̂)‖_F in the smoothed space
    residual: torch.Tensor  # [B, N, K] float32, deq(qweight): the residual as stored


def decompose(
    W: torch.Tensor,
    smooth: torch.Tensor,
    *,
    rank: int,
    refine_iters: int,
    smoothed_residual: bool,
    dtype: torch.dtype,
    seed: int = 0,
) -> Decomposition:
    """SVDQuant's split of ``W`` for ``B`` candidate smoothing factors at once.

    ``Ŵ_b = W·diag(λ_b)``; the rank-``r`` branch is the (randomized) SVD of ``Ŵ_b``
    (:func:`svdkernels.rsvd`, one batched call), then ``refine_iters`` times
    ``L̂ ← SVD_r(Ŵ − Q(Ŵ − L̂))`` (the paper's optional refinement, ``Q`` the int4
    round trip in the space the residual is stored in). Of the iterates, each
    candidate keeps the one with the smallest weight error
    ``‖Ŵ − L̂ − Q(Ŵ − L̂)‖_F``, so refining never makes it larger.

    The factors are rounded to ``dtype`` before the residual is formed, so the
    residual absorbs their rounding error.

    Args:
        W: ``[N, K]`` float weight (finite, ``K`` a multiple of 64).
        smooth: ``[B, K]`` positive smoothing factors ``λ``, one row per candidate.
        rank: ``r``, a multiple of 16 (0: no branch).
        refine_iters: refinement iterations (>= 0).
        smoothed_residual: ``True`` (W4A4): quantise ``R̂ = Ŵ − L̂``, which the
            GEMM multiplies by ``Q(x/λ)``; ``False`` (W4A16): quantise the
            unsmoothed ``R = R̂·diag(1/λ)``, which multiplies ``x`` itself.
        dtype: the layer's compute dtype (of ``scales``, ``L_down``, ``L_up``).
        seed: seed of the rsvd sketches.
    """
    W = W.float().contiguous()  # any strides in; the packed outputs are row-major
    lam = smooth.float()[:, None, :]  # [B, 1, K]
    W_hat = W[None] * lam  # [B, N, K]

    def split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> tuple[Decomposition, torch.Tensor]:
        L_up = (U * S[:, None, :]).to(dtype)
        L_down = (Vh / lam).to(dtype)
        L_hat = (L_up.float() @ L_down.float()) * lam  # the branch as the layer computes it, smoothed
        R_hat = W_hat - L_hat
        q, s, deq = _quant_dequant(R_hat if smoothed_residual else R_hat / lam, dtype)
        deq_hat = deq if smoothed_residual else deq * lam
        err = torch.linalg.vector_norm(R_hat - deq_hat, dim=(1, 2))
        return Decomposition(q, s, L_down.contiguous(), L_up.contiguous(), err, deq), deq_hat

    B, (N, K) = smooth.shape[0], W.shape
    if rank == 0:
        return split(W.new_zeros(B, N, 0), W.new_zeros(B, 0), W.new_zeros(B, 0, K))[0]
    best, deq_hat = split(*rsvd(W_hat, rank, seed=seed))
    for it in range(refine_iters):
        # L̂ ← SVD_r(Ŵ − Q(Ŵ − L̂)): the branch absorbs what quantisation loses.
        current, deq_hat = split(*rsvd(W_hat - deq_hat, rank, seed=seed + 1 + it))
        keep = current.weight_error < best.weight_error
        best = Decomposition(*(torch.where(keep.view(-1, *[1] * (b.dim() - 1)), c, b) for c, b in zip(current, best)))
    return best


# ---------------------------------------------------------------------------
# The layer


class LowRankQuantLinear(nn.Module):
    """SVDQuant linear layer: int4 residual + 16-bit low-rank branch (module docstring).

    Buffers (the layer has no trainable parameters):

    - ``qweight [N, K/2]`` uint8: packed int4 residual (``svdkernels/formats/int4.py``);
    - ``scales [N, K/64]``: its per-group scales, in the layer's *compute dtype*;
    - ``L_down [r, K]`` (holding ``1/λ``) and ``L_up [N, r]``, compute dtype;
    - ``smooth [K]`` float32: the smoothing factors ``λ`` (ones: no smoothing);
    - ``bias [N]`` compute dtype, or ``None``: the bias the ops receive, i.e.
      compensated for the unsigned shift when ``unsigned`` (then never ``None``).

    Attributes: ``in_features`` (K), ``out_features`` (N), ``rank`` (r), ``acts``
    (``"int4"`` or ``None``), ``unsigned`` (bool).

    ``forward(x [..., K]) -> y [..., N]``: ``x`` is cast to the compute dtype, the
    ops run in it (float32 accumulation), and ``y`` is returned in ``x``'s dtype.

    The constructor takes the buffers as stored (e.g. by
    :func:`svdkernels.quant.save_quantized`); build one from a float weight with
    :meth:`from_float`.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    L_down: torch.Tensor
    L_up: torch.Tensor
    smooth: torch.Tensor
    bias: Optional[torch.Tensor]

    @strict_kwargs
    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        L_down: torch.Tensor,
        L_up: torch.Tensor,
        smooth: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        *,
        acts: Optional[str] = "int4",
        unsigned: bool = False,
    ) -> None:
        super().__init__()
        check_acts(acts)
        if not isinstance(unsigned, bool):
            raise TypeError(f"unsigned: expected a bool, got {type(unsigned).__name__}")
        if unsigned and acts is None:
            raise ValueError("unsigned: expected False with acts=None (16-bit activations are not quantised), got True")
        scales = check_tensor("scales", scales)
        check_float("scales", scales)
        dtype = scales.dtype
        for name, t in (("L_down", L_down), ("L_up", L_up), ("bias", bias)):
            if t is not None and check_tensor(name, t).dtype != dtype:
                raise TypeError(
                    f"{name}: expected dtype {dtype} (that of scales, the layer's compute dtype), got {t.dtype}"
                )
        if check_tensor("qweight", qweight).dim() != 2:
            raise ValueError(f"qweight: expected shape [N, K/2] (2-D), got {list(qweight.shape)}")
        K = 2 * qweight.shape[1]
        check_group_dim("qweight (K = 2 * qweight.shape[1])", K)
        # The ops' own validation, on an empty input of the compute dtype: every
        # shape, dtype, layout and device mismatch is reported here, at build time.
        probe = torch.empty(0, K, dtype=dtype, device=qweight.device)
        validate_w4a16(probe, qweight, scales, L_down, L_up, bias)
        validate_quantize_act(probe, smooth, L_down)
        if smooth.dtype != torch.float32:
            raise TypeError(f"smooth: expected dtype torch.float32, got {smooth.dtype}")
        if not bool((smooth > 0).all()) or not bool(torch.isfinite(smooth).all()):
            raise ValueError("smooth: expected positive finite smoothing factors, got a value <= 0, NaN or inf")
        if unsigned and bias is None:
            raise ValueError("bias: expected the compensated bias (never None) with unsigned=True, got None")
        for name, t in (("scales", scales), ("L_down", L_down), ("L_up", L_up), ("bias", bias)):
            if t is not None:
                _check_finite(name, t)
        if not bool((scales >= 0).all()):
            raise ValueError("scales: expected non-negative int4 group scales, got a negative value")
        self.in_features, self.out_features = K, qweight.shape[0]
        self.acts, self.unsigned = acts, unsigned
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("L_down", L_down)
        self.register_buffer("L_up", L_up)
        self.register_buffer("smooth", smooth)
        self.register_buffer("bias", bias)

    @property
    def rank(self) -> int:
        """``r``, the rank of the low-rank branch (a multiple of 16)."""
        return self.L_down.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (that of ``scales``)."""
        return self.scales.dtype

    @classmethod
    @strict_kwargs
    def from_float(
        cls,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        *,
        smooth: Optional[torch.Tensor] = None,
        rank: int = 32,
        refine_iters: int = DEFAULT_REFINE_ITERS,
        acts: Optional[str] = "int4",
        unsigned: bool = False,
        dtype: Optional[torch.dtype] = None,
        seed: int = 0,
    ) -> "LowRankQuantLinear":
        """Quantise a float linear layer (:func:`decompose`).

        Args:
            weight: ``[N, K]`` float32/16, finite, ``K`` a multiple of 64.
            bias: ``[N]`` or ``None``.
            smooth: ``λ [K]`` positive, or ``None`` (ones: no smoothing).
            rank: ``r``, a multiple of 16, ``<= min(N, K)``; 0: plain round-to-nearest int4.
            refine_iters: iterations of ``L ← SVD_r(Ŵ − Q(Ŵ − L))``.
            acts: ``"int4"`` (W4A4) or ``None`` (W4A16).
            unsigned: unsigned int4 activations (inputs ``>= -0.171875``); W4A4 only.
            dtype: compute dtype (``None``: ``weight.dtype``).
            seed: seed of the randomized SVD.
        """
        weight = check_tensor("weight", weight)
        check_float("weight", weight)
        if weight.dim() != 2:
            raise ValueError(f"weight: expected shape [N, K] (2-D), got {list(weight.shape)}")
        N, K = weight.shape
        check_group_dim("weight", K)
        check_rank(rank, N, K)
        check_acts(acts)
        if isinstance(refine_iters, bool) or not isinstance(refine_iters, int) or refine_iters < 0:
            raise ValueError(f"refine_iters: expected a non-negative int, got {refine_iters!r}")
        dtype = weight.dtype if dtype is None else dtype
        _check_finite("weight", weight)
        if bias is not None:
            check_tensor("bias", bias)
            if tuple(bias.shape) != (N,):
                raise ValueError(f"bias: expected shape [N] = [{N}], got {list(bias.shape)}")
        if smooth is None:
            smooth = torch.ones(K, device=weight.device)
        check_tensor("smooth", smooth)
        if tuple(smooth.shape) != (K,):
            raise ValueError(f"smooth: expected shape [K] = [{K}], got {list(smooth.shape)}")
        smooth = smooth.float()
        _check_finite("smooth", smooth)
        if not bool((smooth > 0).all()):
            raise ValueError(f"smooth: expected positive smoothing factors (x is divided by them), got minimum "
                             f"{float(smooth.min()):g}")
        if bias is not None:
            _check_finite("bias", bias)
        _check_seed(seed)
        d = decompose(
            weight, smooth[None], rank=rank, refine_iters=refine_iters,
            smoothed_residual=acts is not None, dtype=dtype, seed=seed,
        )
        return cls.from_parts(d.qweight[0], d.scales[0], d.L_down[0], d.L_up[0], smooth, bias, acts=acts,
                              unsigned=unsigned)

    @classmethod
    @strict_kwargs
    def from_parts(
        cls,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        L_down: torch.Tensor,
        L_up: torch.Tensor,
        smooth: torch.Tensor,
        bias: Optional[torch.Tensor],
        *,
        acts: Optional[str],
        unsigned: bool,
    ) -> "LowRankQuantLinear":
        """The layer from a decomposition and the *float* bias: the bias is cast to
        the compute dtype, or compensated for the unsigned shift (in float64) when
        ``unsigned``."""
        if unsigned:
            bias = compensate_unsigned_bias(qweight, scales, bias, smooth)
        elif bias is not None:
            bias = bias.detach().to(scales.dtype)
        return cls(qweight, scales, L_down, L_up, smooth, bias, acts=acts, unsigned=unsigned)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., K]`` -> ``y [..., N]`` in ``x.dtype`` (computed in :attr:`dtype`)."""
        # A model calls this per layer and token batch, so its Python is kept short: the
        # buffers come from one dict (not nn.Module.__getattr__ each), and a cast that
        # would return x itself is not dispatched.
        b = self._buffers
        dtype = b["scales"].dtype
        xc = x if x.dtype == dtype else x.to(dtype)
        if self.acts is None:
            y = lowrank_w4a16_linear(xc, b["qweight"], b["scales"], L_down=b["L_down"], L_up=b["L_up"], bias=b["bias"])
        else:
            # One op: on the CPU one C++ call, activations quantised straight into the GEMM's layout.
            y = lowrank_w4a4_linear(xc, b["smooth"], b["L_down"], b["qweight"], b["scales"], b["L_up"], b["bias"],
                                    unsigned=self.unsigned)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def merge_lora(self, A: torch.Tensor, B: torch.Tensor, scale: float = 1.0) -> "LowRankQuantLinear":
        """Add a LoRA ``scale·B·A`` to the low-rank branch, in place (SVDQuant/Nunchaku).

        The factors are concatenated along the rank: ``L_down ← [L_down; A; 0]``,
        ``L_up ← [L_up, scale·B, 0]``, zero-padded to a multiple of 16. The LoRA's
        ``A`` reads the unsmoothed ``x``, exactly as ``L_down`` does, so it goes in
        as is. The layer then computes its old output plus ``scale·(x·Aᵀ)·Bᵀ`` (the
        added part in 16-bit factors, float32 accumulation; exact for float32 layers).

        Args:
            A: ``[r2, K]`` (LoRA down, peft's ``lora_A.weight``).
            B: ``[N, r2]`` (LoRA up, peft's ``lora_B.weight``).
            scale: peft's ``lora_alpha / r``.

        Returns:
            ``self``.
        """
        A, B = check_tensor("A", A), check_tensor("B", B)
        check_float("A", A)
        check_float("B", B)
        if A.dim() != 2 or A.shape[1] != self.in_features:
            raise ValueError(f"A: expected shape [r2, K] with K = {self.in_features}, got {list(A.shape)}")
        r2 = A.shape[0]
        if tuple(B.shape) != (self.out_features, r2):
            raise ValueError(f"B: expected shape [N, r2] = [{self.out_features}, {r2}], got {list(B.shape)}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale: expected a finite float, got {scale!r}")
        if not math.isfinite(scale):
            raise ValueError(f"scale: expected a finite float, got {scale!r}")
        _check_finite("A", A)
        _check_finite("B", B)
        pad = -r2 % RANK_MULTIPLE
        like = dict(dtype=self.dtype, device=self.L_down.device)
        A = torch.cat([A.detach().to(**like), torch.zeros(pad, self.in_features, **like)])
        B = torch.cat([(B.detach().float() * scale).to(**like), torch.zeros(self.out_features, pad, **like)], dim=1)
        self.L_down = torch.cat([self.L_down, A]).contiguous()
        self.L_up = torch.cat([self.L_up, B], dim=1).contiguous()
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"weights=int4, acts={self.acts}, unsigned={self.unsigned}, dtype={self.dtype}, "
            f"bias={self.bias is not None}"
        )
