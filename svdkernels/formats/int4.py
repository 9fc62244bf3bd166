"""Int4 formats of SVDQuant (Li et al. 2024, "SVDQuant: Absorbing Outliers by
Low-Rank Components for 4-Bit Diffusion Models"): packing, quantisation and
dequantisation of weights and activations.

This module is the single definition of the packed layouts that every backend of
the ``lowrank_*`` ops (reference, C++, Triton) reads. It depends on torch only.

Groups
------
Both operands are quantised in groups of ``GROUP_SIZE = 64`` consecutive elements
along ``K`` (the reduction dimension, ``in_features``), so ``K`` must be a multiple
of 64. Rounding is round-half-to-even (``torch.round``).

Nibble packing (weights and activations alike)
----------------------------------------------
A row of ``K`` int4 values ``q[0..K-1]`` is stored as ``K/2`` bytes (``uint8``)::

    byte[j] = (q[2j] & 0xF) | ((q[2j+1] & 0xF) << 4)

i.e. the **even** ``k`` is the **low** nibble and the odd ``k`` the high nibble.
Signed values are two's-complement nibbles (``-1 -> 0xF``, ``-8 -> 0x8``);
unsigned values are ``0..15``. One group of 64 is 32 consecutive bytes.

Why this layout: a kernel unpacks a byte tile ``b`` to int8 with at most two
shifts per nibble and no shuffles, ``lo = (b << 4) >> 4`` and ``hi = b >> 4`` on int8
(arithmetic shifts sign-extend; for unsigned data ``b & 0xF`` and ``b >> 4`` on
uint8). Because activations and weights share the layout, an int4 x int4 dot
product needs no re-interleaving either: over a byte range,
``sum_k x_k w_k = dot(lo(xq), lo(qw)) + dot(hi(xq), hi(qw))``, two int8
tensor-core dots on ``[*, BK/2]`` tiles. A 16-bit activation operand is split
into even and odd columns instead (``x.reshape(..., BK/2, 2)`` then a split,
or two strided loads), which is cheap because activations are the small operand.
The C++ CPU kernel does the same: it de-interleaves the (small) activations once
per call and turns nibbles into float32 (bfloat16) weights with one table
permute per 16 (32) values.

Weights (W4, symmetric)
-----------------------
``quantize_weight(W [N, K]) -> (qweight, scales)``:

- ``scales [N, K/64]``, in the activation dtype: ``s = absmax(group) / 7``,
  rounded to that dtype;
- ``q = clamp(round(W / s), -8, 7)`` (with the rounded ``s``), packed to
  ``qweight [N, K/2] uint8`` as above (row ``n`` = output feature ``n``);
- dequantised ``W[n, k] = q[n, k] * scales[n, k // 64]``.

A group whose absmax is zero (or whose scale underflows to zero in a 16-bit
dtype) has ``s = 0`` and ``q = 0``: it dequantises to exact zeros, never NaN.

Activations (A4, per token and group)
-------------------------------------
``quantize_act(x [..., K]) -> (xq [..., K/2] uint8, xscale [..., K/64] float32)``,
one scale per token (row) and group:

- signed (default): ``s = absmax / 7``, ``q = clamp(round(x / s), -8, 7)``,
  ``x ≈ q * s``;
- unsigned (``unsigned=True``, for non-negative inputs such as the output of a
  GELU, whose minimum is about -0.17): the input is first shifted by
  ``UNSIGNED_SHIFT = 0.171875`` so it is non-negative, then ``s = max / 15``,
  ``q = clamp(round((x + 0.171875) / s), 0, 15)``, ``x ≈ q * s - 0.171875``
  (values below ``-0.171875`` clamp to ``q = 0``). The unsigned grid spends all
  16 levels on one sign: half the step of the signed grid for the same range.

With smoothing factors ``λ [K]`` (``smooth=``, SVDQuant), what is quantised is
``x/λ`` (signed) or ``(x + 0.171875)/λ`` (unsigned: shifted first, so it stays
non-negative whatever ``λ``).

``xscale`` is float32 (a 16-bit scale could overflow for inputs divided by
a small smoothing factor; it costs 4 bytes per 32 bytes of ``xq``).

The shift and the W4A4 GEMM
---------------------------
The GEMM (``lowrank_w4a4_gemm``) multiplies ``q * s`` as stored, so with unsigned
activations it computes ``sum_k (x_k/λ_k + c/λ_k) R[n, k]`` (``c`` the shift).
The extra ``c · sum_k R[n, k] / λ_k`` is a
constant per output feature; SVDQuant removes it through the bias, once, at
conversion time: :func:`compensate_unsigned_bias` returns
``bias[n] - c · sum_k deq(R)[n, k] / λ_k`` for the layer to pass as the GEMM's
``bias``.
"""
from __future__ import annotations

from typing import Optional

import torch

GROUP_SIZE = 64
"""Quantisation group size along K, for weights and activations."""

UNSIGNED_SHIFT = 0.171875
"""Added to activations before unsigned quantisation (SVDQuant; GELU(x) >= -0.17)."""

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

__all__ = [
    "GROUP_SIZE",
    "UNSIGNED_SHIFT",
    "compensate_unsigned_bias",
    "dequantize_act",
    "dequantize_weight",
    "pack_int4",
    "quantize_act",
    "quantize_weight",
    "unpack_int4",
]


# ---------------------------------------------------------------------------
# Argument checks (shared with svdkernels/ops/lowrank_quant.py)


def check_tensor(name: str, t: object) -> torch.Tensor:
    """``t`` if it is a tensor, else ``TypeError`` naming ``name``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def check_float(name: str, t: torch.Tensor) -> None:
    """``TypeError`` unless ``t`` is float32, float16 or bfloat16."""
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32, float16 or bfloat16, got {t.dtype}")


def check_group_dim(name: str, K: int) -> None:
    """``ValueError`` unless ``K`` (the last dim of ``name``) is a positive multiple of 64."""
    if K <= 0 or K % GROUP_SIZE:
        raise ValueError(
            f"{name}: expected the last dim K to be a positive multiple of the group size "
            f"{GROUP_SIZE}, got K = {K}"
        )


def check_packed(name: str, t: torch.Tensor) -> None:
    """``TypeError`` unless ``t`` is uint8 (packed int4 nibbles)."""
    if t.dtype != torch.uint8:
        raise TypeError(f"{name}: expected dtype uint8 (two int4 values per byte), got {t.dtype}")


# ---------------------------------------------------------------------------
# Nibbles


def pack_int4(q: torch.Tensor, *, signed: bool = True) -> torch.Tensor:
    """Pack int4 values ``q [..., K]`` into bytes ``[..., K/2]`` uint8.

    Even ``k`` goes to the low nibble, odd ``k`` to the high nibble; signed values
    (``[-8, 7]``) as two's-complement nibbles, unsigned ones (``[0, 15]``) as is.

    Raises:
        TypeError: ``q`` is not an integer tensor.
        ValueError: ``K`` is odd, or a value is outside the int4 range.
    """
    check_tensor("q", q)
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise TypeError(f"q: expected an integer dtype, got {q.dtype}")
    if q.dim() < 1 or q.shape[-1] % 2:
        raise ValueError(f"q: expected shape [..., K] with K even, got {tuple(q.shape)}")
    lo, hi = (-8, 7) if signed else (0, 15)
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(
            f"q: expected values in [{lo}, {hi}] ({'signed' if signed else 'unsigned'} int4), "
            f"got values in [{int(q.min())}, {int(q.max())}]"
        )
    return _pack(q)


def _pack(q: torch.Tensor) -> torch.Tensor:
    """:func:`pack_int4` without the checks (which synchronise with the host)."""
    nib = q.to(torch.int16) & 0xF
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, *, signed: bool = True) -> torch.Tensor:
    """Unpack bytes ``[..., K/2]`` uint8 into int4 values ``[..., K]`` int8.

    The inverse of :func:`pack_int4`: signed gives ``[-8, 7]``, unsigned ``[0, 15]``.
    """
    check_tensor("packed", packed)
    check_packed("packed", packed)
    if packed.dim() < 1:
        raise ValueError(f"packed: expected shape [..., K/2], got {tuple(packed.shape)}")
    b = packed.to(torch.int16)
    lo, hi = b & 0xF, b >> 4
    if signed:  # two's complement: nibbles 8..15 are -8..-1
        lo, hi = lo - ((lo & 8) << 1), hi - ((hi & 8) << 1)
    return torch.stack((lo, hi), dim=-1).flatten(-2).to(torch.int8)


def _grouped(t: torch.Tensor) -> torch.Tensor:
    """``[..., K] -> [..., K/64, 64]``."""
    return t.unflatten(-1, (t.shape[-1] // GROUP_SIZE, GROUP_SIZE))


# ---------------------------------------------------------------------------
# Weights


def quantize_weight(W: torch.Tensor, *, dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 quantisation of a linear weight, group 64 along ``K``.

    Args:
        W: ``[N, K]`` (``out_features x in_features``) float32, float16 or
            bfloat16, finite, ``K`` a multiple of 64.
        dtype: dtype of ``scales``, i.e. the activation dtype the layer runs in
            (``None``: ``W.dtype``).

    Returns:
        ``qweight [N, K/2] uint8`` (layout in the module docstring) and
        ``scales [N, K/64]`` in ``dtype``; ``W ≈ dequantize_weight(qweight, scales)``
        with ``|error| <= scales/2`` elementwise.

    Raises:
        TypeError: ``W`` or ``dtype`` is not a supported float dtype.
        ValueError: ``W`` is not 2-D, ``K`` is not a multiple of 64, ``W`` has a
            NaN or infinity, or a scale overflows ``dtype``.
    """
    check_tensor("W", W)
    check_float("W", W)
    dtype = W.dtype if dtype is None else dtype
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype: expected float32, float16 or bfloat16, got {dtype}")
    if W.dim() != 2:
        raise ValueError(f"W: expected shape [N, K] (2-D), got {tuple(W.shape)}")
    check_group_dim("W", W.shape[1])
    bad = ~torch.isfinite(W)
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"W: expected finite values, got {W[idx].item()} at index {idx}")
    Wg = _grouped(W.float())  # [N, K/64, 64]
    scales = (Wg.abs().amax(-1) / 7).to(dtype)  # [N, K/64]
    if not torch.isfinite(scales).all():
        raise ValueError(
            f"W: absmax/7 of a group overflows the scales dtype {dtype} (max |W| = {W.abs().max().item():.4g})"
        )
    s = scales.float().unsqueeze(-1)
    # Division by the *rounded* scale keeps |W/s| <= 7 up to one rounding; a zero
    # scale (zero group, or underflow in 16 bits) gives q = 0 instead of 0/0 = NaN.
    q = torch.where(s > 0, torch.round(Wg / torch.where(s > 0, s, 1.0)), 0.0).clamp_(-8, 7)
    return _pack(q.to(torch.int16).flatten(-2)), scales


def dequantize_weight(
    qweight: torch.Tensor, scales: torch.Tensor, *, dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """``W [N, K] = q · s`` from ``qweight [N, K/2] uint8`` and ``scales [N, K/64]``.

    The product is formed in float32 and rounded once to ``dtype`` (``None``:
    ``scales.dtype``).
    """
    check_tensor("qweight", qweight)
    check_tensor("scales", scales)
    check_packed("qweight", qweight)
    check_float("scales", scales)
    if qweight.dim() != 2 or scales.dim() != 2:
        raise ValueError(
            f"qweight, scales: expected 2-D [N, K/2] and [N, K/64], got {tuple(qweight.shape)} and {tuple(scales.shape)}"
        )
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    check_group_dim("qweight (unpacked)", K)
    if tuple(scales.shape) != (N, K // GROUP_SIZE):
        raise ValueError(
            f"scales: expected shape [N, K/64] = {(N, K // GROUP_SIZE)} for qweight of shape "
            f"{tuple(qweight.shape)}, got {tuple(scales.shape)}"
        )
    q = _grouped(unpack_int4(qweight).float())
    return (q * scales.float().unsqueeze(-1)).flatten(-2).to(dtype or scales.dtype)


# ---------------------------------------------------------------------------
# Activations


def _check_smooth(smooth: Optional[torch.Tensor], K: int) -> None:
    if smooth is None:
        return
    check_tensor("smooth", smooth)
    check_float("smooth", smooth)
    if tuple(smooth.shape) != (K,):
        raise ValueError(f"smooth: expected shape [K] = ({K},), got {tuple(smooth.shape)}")


def quantize_act(
    x: torch.Tensor, *, unsigned: bool = False, smooth: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token, per-group-of-64 int4 quantisation of activations.

    Args:
        x: ``[..., K]`` float32, float16 or bfloat16, ``K`` a multiple of 64.
        unsigned: quantise ``x + 0.171875`` to ``[0, 15]`` (inputs >= -0.171875,
            e.g. after a GELU) instead of ``x`` to ``[-8, 7]``.
        smooth: SVDQuant's smoothing factors ``λ [K]`` (positive), or ``None``:
            quantise ``x/λ`` (signed) or ``(x + 0.171875)/λ`` (unsigned; shifted
            first, so the input stays non-negative whatever ``λ``).

    Returns:
        ``xq [..., K/2] uint8`` and ``xscale [..., K/64] float32`` (module docstring).
        Groups whose (shifted) absmax is zero get ``xscale = 0`` and ``q = 0``.
        Computed in float32, no host synchronisation (NaN inputs give NaN scales,
        not an error).
    """
    check_tensor("x", x)
    check_float("x", x)
    if x.dim() < 1:
        raise ValueError(f"x: expected shape [..., K], got {tuple(x.shape)}")
    check_group_dim("x", x.shape[-1])
    _check_smooth(smooth, x.shape[-1])
    v = x.float()
    if unsigned:
        v = v + UNSIGNED_SHIFT
    if smooth is not None:
        v = v / smooth.float()
    vg = _grouped(v)
    if unsigned:
        vg = vg.clamp(min=0)
        scale, qmin, qmax = vg.amax(-1) / 15, 0, 15
    else:
        scale, qmin, qmax = vg.abs().amax(-1) / 7, -8, 7
    s = scale.unsqueeze(-1)
    q = torch.where(s > 0, torch.round(vg / torch.where(s > 0, s, 1.0)), 0.0).clamp_(qmin, qmax)
    return _pack(q.to(torch.int16).flatten(-2)), scale


def dequantize_act(
    xq: torch.Tensor,
    xscale: torch.Tensor,
    *,
    unsigned: bool = False,
    smooth: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The inverse of :func:`quantize_act`: ``x [..., K]`` in ``dtype``.

    ``q · s · λ`` (signed) or ``q · s · λ - 0.171875`` (unsigned), with ``λ = 1``
    when ``smooth`` is ``None``; formed in float32.
    """
    check_tensor("xq", xq)
    check_tensor("xscale", xscale)
    check_packed("xq", xq)
    if xscale.dtype != torch.float32:
        raise TypeError(f"xscale: expected dtype float32, got {xscale.dtype}")
    K = 2 * xq.shape[-1] if xq.dim() else 0
    check_group_dim("xq (unpacked)", K)
    if tuple(xscale.shape) != (*xq.shape[:-1], K // GROUP_SIZE):
        raise ValueError(
            f"xscale: expected shape [..., K/64] = {(*xq.shape[:-1], K // GROUP_SIZE)} for xq of shape "
            f"{tuple(xq.shape)}, got {tuple(xscale.shape)}"
        )
    _check_smooth(smooth, K)
    q = _grouped(unpack_int4(xq, signed=not unsigned).float())
    x = (q * xscale.unsqueeze(-1)).flatten(-2)
    if smooth is not None:
        x = x * smooth.float()
    return (x - UNSIGNED_SHIFT if unsigned else x).to(dtype)


def compensate_unsigned_bias(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    smooth: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The bias to give ``lowrank_w4a4_gemm`` when its activations are unsigned.

    Unsigned quantisation stores ``(x + c)/λ`` (``c = 0.171875``), so the GEMM's
    ``deq(xq)·deq(W)ᵀ`` carries an extra ``c · sum_k deq(W)[n, k] / λ_k`` per output
    feature. This returns ``bias - c · (deq(W) / λ).sum(1)`` (``[N]``, in
    ``scales.dtype``; computed in float64), which cancels it.

    Args:
        qweight, scales: the packed weight ``[N, K/2]`` and its scales ``[N, K/64]``.
        bias: ``[N]`` or ``None`` (zero).
        smooth: the smoothing factors ``λ [K]`` given to ``lowrank_quantize_act``,
            or ``None`` (no smoothing).
    """
    W = dequantize_weight(qweight, scales, dtype=torch.float64)
    N, K = W.shape
    _check_smooth(smooth, K)
    if smooth is not None:
        W = W / smooth.double()
    out = -UNSIGNED_SHIFT * W.sum(1)
    if bias is not None:
        check_tensor("bias", bias)
        if tuple(bias.shape) != (N,):
            raise ValueError(f"bias: expected shape [N] = ({N},), got {tuple(bias.shape)}")
        out = out + bias.double()
    return out.to(scales.dtype)
