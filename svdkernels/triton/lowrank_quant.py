"""Triton backend of the SVDQuant ops (Li et al. 2024, "SVDQuant: Absorbing Outliers
by Low-Rank Components for 4-Bit Diffusion Models"):

    y = Q(x/λ)·Q(R)ᵀ + (x·L_downᵀ)·L_upᵀ + bias

Packed formats (``svdkernels/formats/int4.py``): ``qweight [N, K/2]`` and ``xq [M, K/2]``
uint8 with the even ``k`` in the low nibble; groups of 64 along ``K`` (32 bytes);
``scales [N, K/64]`` in the activation dtype, ``xscale [M, K/64]`` float32.

Kernels
-------
- :func:`_quantize_act_kernel` (``lowrank_quantize_act``): a program owns ``BLOCK_M``
  rows of ``x`` and walks all of ``K`` one group at a time, so each (row, group) scale
  and the down projection ``x·L_downᵀ`` (float32, the unsmoothed ``x``) are computed
  by one program: no atomics, deterministic. The quantisation repeats
  :func:`svdkernels.quant.quantize_act`'s float32 operations in its order, so
  ``xq`` and ``xscale`` are bit-identical to it: correctly rounded divisions
  (``div_rn``; triton's ``/`` is the approximate ``div.full.f32``) and
  round-half-to-even by the ``1.5·2²³`` trick (:func:`_rint`). Ranks beyond
  ``BLOCK_R`` get more programs per row block (grid axis ``r``); only the first of
  them quantises. With ``QUANTIZE=False`` the same kernel is the down-projection
  pre-pass of ``lowrank_w4a16_linear``.
- :func:`_w4a4_gemm_kernel` (``lowrank_w4a4_gemm``): a ``BLOCK_M × BLOCK_N`` output tile,
  ``K`` one group per iteration. Both operands share the nibble layout, so no
  interleaving is needed: ``Σ_k x_k w_k = lo(xq)·lo(qw)ᵀ + hi(xq)·hi(qw)ᵀ``, two int8
  ``tl.dot`` s (K = 32 each) into one int32 sum, exact (``|sum| ≤ 64·15·8``). The
  group's sum becomes float32 and is rescaled by ``xscale[m, g]·scales[n, g]``, the
  reference's float32 operations in its order (on the GPU the last multiply-add may
  be contracted to an FMA). Nibbles are unpacked to int8 in registers (sign-extended
  by shifts, or ``0..15`` for unsigned activations), so the dot runs on the int8
  tensor cores of sm_80 and sm_90 alike (Hopper's tensor cores have no int4 mode).
- :func:`_w4a16_kernel` (``lowrank_w4a16_linear``): the same tiling with 16-bit (or
  float32) ``x``. The weight's nibbles, unpacked in registers, are put back in ``k``
  order by ``tl.join(lo, hi)`` and a reshape: each thread holds both nibbles of its
  bytes, so this is a register renaming, and ``x`` is loaded in its natural layout
  (contiguous, vectorised; splitting ``x`` into even and odd columns instead would
  cost strided loads or a shuffle of the operand that the prefill tiles make large).
  Each group's dot (float32) is multiplied by ``scales[n, g]`` in float32.

Both GEMMs end with the same epilogue (:func:`_epilogue`): ``+ lowrank_act·L_upᵀ``,
``+ bias``, one rounding to the output dtype. The W4A16 low-rank branch is two
passes: ``t = x·L_downᵀ`` by the quantisation kernel without quantising (float32,
``[M, r]``), then ``t·L_upᵀ`` in the GEMM's epilogue. Fusing the down projection
into the GEMM's K loop would make every N-tile program recompute it and read all
of ``L_down`` (``r·K`` 16-bit values: 2-4x its own weight tile's bytes at
``BLOCK_N = 64-32``, ``r = 32``); the pre-pass reads ``x`` once more and costs a
launch, which matters only when decoding tiny layers.

Precision
---------
Float32 accumulation everywhere. The epilogue's ``lowrank_act·L_upᵀ`` is float32 on
the tensor cores as 2xTF32 (``lowrank_act = hi + lo``, both TF32; 16-bit ``L_up`` is
exact in TF32, ~21 correct bits per product) or 3xTF32 for a float32 ``L_up``
(``svdkernels.triton.common.dot_acc``). W4A16 with float32 ``x`` is 2xTF32 the same
way (int4 weights are exact in TF32); 16-bit ``x`` is a 16-bit ``tl.dot`` (exact
products). Under the interpreter, bfloat16 goes through float32 (its bfloat16
``tl.dot`` and casts are wrong: see ``dot_acc``), which gives the GPU's values.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from svdkernels.formats.int4 import GROUP_SIZE, UNSIGNED_SHIFT
from svdkernels.triton.common import CompileCase, PTR, dot_acc, interpreted, round_mantissa


GROUP_BYTES = GROUP_SIZE // 2
"""Bytes of one packed group of 64 int4 values."""

BLOCK_R = 32
"""Rank chunk of the low-rank dots (SVDQuant's rank; larger ranks loop or add programs)."""

GROUP_M = 8
"""Row tiles per band of the GEMMs' grid swizzle (L2 reuse of both operands)."""

# The packing constants as kernels see them (a jit function reads constexpr globals only).
_GROUP = tl.constexpr(GROUP_SIZE)
_GROUP_BYTES = tl.constexpr(GROUP_BYTES)
_SHIFT = tl.constexpr(UNSIGNED_SHIFT)


# --------------------------------------------------------------------------- helpers


@triton.jit
def _tile_coords(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of this program. Consecutive programs cover a band of
    ``GROUP_M`` row tiles one column tile at a time, so the band's activations and
    each weight panel are reused from L2 while they are hot."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    per_band = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // per_band) * GROUP_M
    rows = tl.minimum(n_m - first_m, GROUP_M)
    return first_m + (pid % per_band) % rows, (pid % per_band) // rows


@triton.jit
def _gemm_tile(qw_ptr, ws_ptr, M, N, G,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile of a GEMM against ``qweight [N, G·32]``, ``scales [N, G]``:
    ``(pid_m, pid_n, rows lm, columns ln, their masks, qweight and scales at the tile's
    first row, group 0, and the int32 byte offsets of a [BLOCK_N, 32] weight group)``."""
    pid_m, pid_n = _tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    lm = tl.arange(0, BLOCK_M)
    ln = tl.arange(0, BLOCK_N)
    col0 = pid_n.to(tl.int64) * BLOCK_N
    w_off = ln[:, None] * (G * _GROUP_BYTES) + tl.arange(0, _GROUP_BYTES)[None, :]
    return (pid_m, pid_n, lm, ln, pid_m * BLOCK_M + lm < M, pid_n * BLOCK_N + ln < N,
            qw_ptr + col0 * (G * _GROUP_BYTES), ws_ptr + col0 * G, w_off)


@triton.jit
def _nibbles(b, SIGNED: tl.constexpr):
    """uint8 bytes -> (low, high) nibbles as int8: two's complement ``[-8, 7]`` (signed,
    sign-extended by arithmetic shifts) or ``[0, 15]``."""
    if SIGNED:
        s = b.to(tl.int8, bitcast=True)
        lo = (s << 4) >> 4
        hi = s >> 4
    else:
        lo = (b & 0xF).to(tl.int8)
        hi = (b >> 4).to(tl.int8)
    return lo, hi


@triton.jit
def _max_nan(a, b):
    """max that propagates NaN, as torch's ``amax`` does."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _rint(y):
    """``y`` rounded to the nearest integer, ties to even, for float32 ``|y| < 2²²``:
    ``y + 1.5·2²³`` lies in ``[2²³, 2²⁴)`` where the float32 spacing is 1, so the
    addition rounds (to nearest even) and the subtraction is exact. What
    ``torch.round`` does, with plain adds (libdevice's ``rint`` does not run under
    the interpreter)."""
    return (y + 12582912.0) - 12582912.0


@triton.jit
def _epilogue(acc, pid_m, pid_n, M, N, R, la_ptr, stride_lam, stride_lar, lu_ptr, bias_ptr, y_ptr,
              HAS_BIAS: tl.constexpr, BF16_EMULATED: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """Store ``acc + lowrank_act·L_upᵀ + bias`` (float32, rounded once) to tile
    ``(pid_m, pid_n)`` of ``y [M, N]`` (contiguous); ``la_ptr``: ``lowrank_act [M, R]``
    float32, ``lu_ptr``: ``L_up [N, R]`` contiguous, ``bias_ptr``: ``[N]``."""
    # 16-bit L_up is exact in TF32: 2xTF32 products; float32 L_up: 3xTF32.
    LU_IS_TF32: tl.constexpr = lu_ptr.dtype.element_ty != tl.float32
    lm = tl.arange(0, BLOCK_M)
    ln = tl.arange(0, BLOCK_N)
    m_ok = pid_m * BLOCK_M + lm < M
    n_ok = pid_n * BLOCK_N + ln < N
    la_base = la_ptr + pid_m.to(tl.int64) * BLOCK_M * stride_lam
    lu_base = lu_ptr + pid_n.to(tl.int64) * BLOCK_N * R
    rr = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):
        r_ok = r0 + rr < R
        la = tl.load(la_base + lm[:, None] * stride_lam + (r0 + rr)[None, :] * stride_lar,
                     mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        lu = tl.load(lu_base + ln[None, :] * R + (r0 + rr)[:, None],  # L_upᵀ [BLOCK_R, BLOCK_N]
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc = dot_acc(la, lu, acc, tl.float32, False, LU_IS_TF32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + pid_n * BLOCK_N + ln, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if BF16_EMULATED:
        acc = round_mantissa(acc, 16)  # the interpreter's float32->bfloat16 cast truncates
    y_base = y_ptr + (pid_m.to(tl.int64) * BLOCK_M * N + pid_n * BLOCK_N)
    tl.store(y_base + lm[:, None] * N + ln[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


# --------------------------------------------------------------------------- kernels
#
# Pointers: a scalar int64 base per tile, advanced once per group, plus int32 offsets
# inside the tile (``BLOCK_M`` rows of a row stride), which keeps 64-bit pointer tiles
# out of the K loop's registers.


@triton.jit
def _quantize_act_kernel(
    x_ptr, smooth_ptr, ld_ptr, xq_ptr, xs_ptr, la_ptr,
    M, G, R,
    stride_xm, stride_xk, stride_smooth,
    QUANTIZE: tl.constexpr, UNSIGNED: tl.constexpr, HAS_LOWRANK: tl.constexpr,
    COMPUTE: tl.constexpr, BF16_EMULATED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Rows ``[m0, m0 + BLOCK_M)`` of ``x [M, G·64]``: (``QUANTIZE``, first rank tile only)
    ``xq [M, G·32]`` uint8 and ``xscale [M, G]`` float32 of ``x/λ`` (``(x + 0.171875)/λ``
    if ``UNSIGNED``); (``HAS_LOWRANK``) columns ``[r0, r0 + BLOCK_R)`` of
    ``lowrank_act [M, R] = x·L_downᵀ`` float32, ``L_down [R, G·64]`` contiguous."""
    pid = tl.program_id(0)
    r_tiles = tl.maximum(tl.cdiv(R, BLOCK_R), 1)
    pid_m = pid // r_tiles
    pid_r = pid % r_tiles
    lm = tl.arange(0, BLOCK_M)
    m_ok = pid_m * BLOCK_M + lm < M
    rk = tl.arange(0, _GROUP)
    rb = tl.arange(0, _GROUP_BYTES)
    lr = tl.arange(0, BLOCK_R)
    r_ok = pid_r * BLOCK_R + lr < R
    row0 = pid_m.to(tl.int64) * BLOCK_M
    x_base = x_ptr + row0 * stride_xm
    ld_base = ld_ptr + pid_r.to(tl.int64) * BLOCK_R * (G * _GROUP)
    x_off = lm[:, None] * stride_xm + rk[None, :] * stride_xk
    ld_off = lr[None, :] * (G * _GROUP) + rk[:, None]  # L_downᵀ [64, BLOCK_R]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for g in range(0, G):
        xt = tl.load(x_base + x_off, mask=m_ok[:, None], other=0.0)
        if QUANTIZE:
            if pid_r == 0:
                # quantize_act's float32 operations, in its order.
                v = xt.to(tl.float32)
                if UNSIGNED:
                    v = v + _SHIFT
                lam = tl.load(smooth_ptr + (g * _GROUP + rk) * stride_smooth).to(tl.float32)
                v = tl.math.div_rn(v, lam[None, :])
                if UNSIGNED:
                    v = tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)
                    scale = tl.math.div_rn(tl.reduce(v, 1, _max_nan), 15.0)
                    qmin, qmax = 0.0, 15.0
                else:
                    scale = tl.math.div_rn(tl.reduce(tl.abs(v), 1, _max_nan), 7.0)
                    qmin, qmax = -8.0, 7.0
                # A zero (or NaN) scale gives q = 0, never 0/0.
                pos = scale > 0
                q = _rint(tl.math.div_rn(v, tl.where(pos, scale, 1.0)[:, None]))
                q = tl.minimum(tl.maximum(tl.where(pos[:, None], q, 0.0), qmin), qmax)
                nib = q.to(tl.int32) & 0xF  # two's complement nibbles
                even, odd = tl.split(tl.reshape(nib, (BLOCK_M, _GROUP_BYTES, 2)))
                xq_tile = xq_ptr + (row0 * G + g) * _GROUP_BYTES
                tl.store(xq_tile + lm[:, None] * (G * _GROUP_BYTES) + rb[None, :],
                         (even | (odd << 4)).to(tl.uint8), mask=m_ok[:, None])
                tl.store(xs_ptr + (row0 * G + g) + lm * G, scale, mask=m_ok)
        if HAS_LOWRANK:
            ld = tl.load(ld_base + ld_off, mask=r_ok[None, :], other=0.0)
            acc = dot_acc(xt, ld, acc, COMPUTE, BF16_EMULATED, False)
        x_base += _GROUP * stride_xk
        ld_base += _GROUP
    if HAS_LOWRANK:
        la_base = la_ptr + row0 * R + pid_r * BLOCK_R
        tl.store(la_base + lm[:, None] * R + lr[None, :], acc, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _w4a4_gemm_kernel(
    xq_ptr, xs_ptr, qw_ptr, ws_ptr, la_ptr, lu_ptr, bias_ptr, y_ptr,
    M, N, G, R,
    stride_xqm, stride_xqk, stride_xsm, stride_xsg, stride_lam, stride_lar,
    UNSIGNED: tl.constexpr, HAS_BIAS: tl.constexpr, BF16_EMULATED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``y [M, N] = Σ_g (Σ_{k∈g} qx_k·qw_k)·xscale[m, g]·scales[n, g] + lowrank_act·L_upᵀ + bias``
    for one ``BLOCK_M × BLOCK_N`` tile; ``qweight [N, G·32]``, ``scales [N, G]``, ``L_up [N, R]``
    contiguous, ``y`` contiguous in ``scales``' dtype."""
    pid_m, pid_n, lm, ln, m_ok, n_ok, qw_base, ws_base, w_off = _gemm_tile(
        qw_ptr, ws_ptr, M, N, G, BLOCK_M, BLOCK_N, GROUP_M)
    row0 = pid_m.to(tl.int64) * BLOCK_M
    xq_base = xq_ptr + row0 * stride_xqm
    xs_base = xs_ptr + row0 * stride_xsm
    x_off = lm[:, None] * stride_xqm + tl.arange(0, _GROUP_BYTES)[None, :] * stride_xqk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, G):
        xlo, xhi = _nibbles(tl.load(xq_base + x_off, mask=m_ok[:, None], other=0), not UNSIGNED)
        wlo, whi = _nibbles(tl.load(qw_base + w_off, mask=n_ok[:, None], other=0), True)
        # Even k with even k, odd with odd: the same sum as in k order, exact in int32.
        s = tl.dot(xlo, tl.trans(wlo), out_dtype=tl.int32)
        s = tl.dot(xhi, tl.trans(whi), s, out_dtype=tl.int32)
        xs = tl.load(xs_base + lm * stride_xsm, mask=m_ok, other=0.0)
        ws = tl.load(ws_base + ln * G, mask=n_ok, other=0.0).to(tl.float32)
        acc += s.to(tl.float32) * (xs[:, None] * ws[None, :])
        xq_base += _GROUP_BYTES * stride_xqk
        xs_base += stride_xsg
        qw_base += _GROUP_BYTES
        ws_base += 1
    _epilogue(acc, pid_m, pid_n, M, N, R, la_ptr, stride_lam, stride_lar, lu_ptr, bias_ptr, y_ptr,
              HAS_BIAS, BF16_EMULATED, BLOCK_M, BLOCK_N, BLOCK_R)


@triton.jit
def _w4a16_kernel(
    x_ptr, qw_ptr, ws_ptr, la_ptr, lu_ptr, bias_ptr, y_ptr,
    M, N, G, R,
    stride_xm, stride_xk, stride_lam, stride_lar,
    COMPUTE: tl.constexpr, HAS_BIAS: tl.constexpr, BF16_EMULATED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``y [M, N] = Σ_g (x_g·q_gᵀ)·scales[n, g] + t·L_upᵀ + bias`` for one ``BLOCK_M × BLOCK_N``
    tile, ``x [M, G·64]`` in ``COMPUTE``, ``t = x·L_downᵀ`` (``la_ptr``, float32 ``[M, R]``);
    other operands and ``y`` as in :func:`_w4a4_gemm_kernel`."""
    pid_m, pid_n, lm, ln, m_ok, n_ok, qw_base, ws_base, w_off = _gemm_tile(
        qw_ptr, ws_ptr, M, N, G, BLOCK_M, BLOCK_N, GROUP_M)
    x_base = x_ptr + pid_m.to(tl.int64) * BLOCK_M * stride_xm
    x_off = lm[:, None] * stride_xm + tl.arange(0, _GROUP)[None, :] * stride_xk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, G):
        xt = tl.load(x_base + x_off, mask=m_ok[:, None], other=0.0)
        lo, hi = _nibbles(tl.load(qw_base + w_off, mask=n_ok[:, None], other=0), True)
        w = tl.reshape(tl.join(lo, hi), (BLOCK_N, _GROUP))  # k order: byte j -> k = 2j, 2j+1
        # int4 values are exact in every compute dtype (and in TF32: 2xTF32 for float32 x).
        part = dot_acc(xt, tl.trans(w), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                        COMPUTE, BF16_EMULATED, True)
        ws = tl.load(ws_base + ln * G, mask=n_ok, other=0.0).to(tl.float32)
        acc += part * ws[None, :]
        x_base += _GROUP * stride_xk
        qw_base += _GROUP_BYTES
        ws_base += 1
    _epilogue(acc, pid_m, pid_n, M, N, R, la_ptr, stride_lam, stride_lar, lu_ptr, bias_ptr, y_ptr,
              HAS_BIAS, BF16_EMULATED, BLOCK_M, BLOCK_N, BLOCK_R)


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class Config:
    """Tiles and launch options of one kernel: ``BLOCK_M`` rows (tokens) per program and,
    for the GEMMs, ``BLOCK_N`` output features (unused by the quantisation kernel)."""

    name: str
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int


# GEMMs (W4A4 and W4A16 share them); the register counts below are ptxas's for
# sm_80 / sm_90, bfloat16, printed by tests/triton/test_lowrank_quant_kernels.py.
# - "decode" (1-16 tokens): memory-bound on the weight. BLOCK_N = 32 gives N/32
#   programs (128 for N = 4096) and a deep pipeline; ~95 registers. Its 16-row dots
#   are below wgmma's M = 64, so on sm_90 they run on mma.sync, which is not the
#   bound at 16 tokens (2 int4 MACs per token per weight byte).
# - "mid" (17-64 tokens) and "prefill" (more): 64 x 64 and 128 x 64 tiles over 8
#   warps, ~130-170 registers. What fills the registers is two accumulators, the
#   float32 sum and the group's int32 sum, plus the unpacked int8 operands; 128 x 128
#   tiles reach 255 and spill with float32 (3xTF32) operands.
CONFIGS: tuple[Config, ...] = (
    Config("decode", BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=4),
    Config("mid", BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3),
    Config("prefill", BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
)

# Activation quantisation (memory-bound: one pass over x). 16-row blocks give many
# programs up to a few thousand tokens; 64-row blocks beyond read L_down 4x less.
QUANT_CONFIGS: tuple[Config, ...] = (
    Config("q16", BLOCK_M=16, BLOCK_N=0, num_warps=4, num_stages=2),
    Config("q64", BLOCK_M=64, BLOCK_N=0, num_warps=8, num_stages=2),
)
_QUANT_ROWS_SMALL = 2048  # up to this many tokens: q16 (at most 128 programs per rank tile)

_COMPUTE: dict[torch.dtype, tl.dtype] = {
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float32: tl.float32,
}


def pick_config(M: int) -> Config:
    """The GEMM config for ``M`` tokens (see :data:`CONFIGS`)."""
    if M <= 16:
        return CONFIGS[0]
    return CONFIGS[1] if M <= 64 else CONFIGS[2]


def pick_quant_config(M: int) -> Config:
    """The quantisation config for ``M`` tokens (see :data:`QUANT_CONFIGS`)."""
    return QUANT_CONFIGS[0] if M <= _QUANT_ROWS_SMALL else QUANT_CONFIGS[1]


# --------------------------------------------------------------------------- launchers



def _bf16_emulated(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and interpreted()


def _gemm_grid(M: int, N: int, config: Config) -> tuple[int]:
    return (triton.cdiv(M, config.BLOCK_M) * triton.cdiv(N, config.BLOCK_N),)


def _quantize_launch(
    x2: torch.Tensor, L_down: torch.Tensor, lowrank_act: torch.Tensor,
    quantize: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]], config: Optional[Config],
) -> None:
    """Fill ``lowrank_act [M, r]`` from ``x2 [M, K]`` and, when ``quantize`` is
    ``(smooth, xq, xscale, unsigned)``, ``xq`` and ``xscale``."""
    M, K = x2.shape
    R = L_down.shape[0]
    config = config or pick_quant_config(M)
    grid = (triton.cdiv(M, config.BLOCK_M) * max(triton.cdiv(R, BLOCK_R), 1),)
    smooth, xq, xscale, unsigned = quantize or (None, None, None, False)  # None: never read
    torch.library.wrap_triton(_quantize_act_kernel)[grid](
        x2, smooth, L_down, xq, xscale, lowrank_act,
        M, K // GROUP_SIZE, R, *x2.stride(), 0 if smooth is None else smooth.stride(0),
        QUANTIZE=quantize is not None, UNSIGNED=unsigned, HAS_LOWRANK=R > 0,
        COMPUTE=_COMPUTE[x2.dtype], BF16_EMULATED=_bf16_emulated(x2.dtype),
        BLOCK_M=config.BLOCK_M, BLOCK_R=BLOCK_R, num_warps=config.num_warps, num_stages=config.num_stages,
    )


def lowrank_quantize_act(
    x: torch.Tensor, smooth: torch.Tensor, L_down: torch.Tensor, unsigned: bool, *, config: Optional[Config] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(xq [..., K/2] uint8, xscale [..., K/64] float32, lowrank_act [..., r] float32)``.

    ``x [..., K]`` (any strides), ``smooth [K]`` (any float dtype and stride),
    ``L_down [r, K]`` contiguous in ``x``'s dtype; validated by the op layer.
    ``xq``/``xscale`` are bit-identical to :func:`svdkernels.quant.quantize_act` on CPU.
    ``config`` overrides :func:`pick_quant_config`.
    """
    K = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)  # a view unless the leading dims cannot be flattened
    M, R = x2.shape[0], L_down.shape[0]
    xq = torch.empty(M, K // 2, dtype=torch.uint8, device=x.device)
    xscale = torch.empty(M, K // GROUP_SIZE, dtype=torch.float32, device=x.device)
    lowrank_act = torch.empty(M, R, dtype=torch.float32, device=x.device)
    if M:
        _quantize_launch(x2, L_down, lowrank_act, (smooth, xq, xscale, unsigned), config)
    return xq.reshape(*lead, K // 2), xscale.reshape(*lead, K // GROUP_SIZE), lowrank_act.reshape(*lead, R)


def lowrank_w4a4_gemm(
    xq: torch.Tensor, xscale: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
    lowrank_act: torch.Tensor, L_up: torch.Tensor, bias: Optional[torch.Tensor], unsigned: bool,
    *, config: Optional[Config] = None,
) -> torch.Tensor:
    """``y [..., N]`` in ``scales.dtype``: ``xq [..., K/2]``, ``xscale [..., K/64]``,
    ``lowrank_act [..., r]`` (any strides), ``qweight [N, K/2]``, ``scales [N, K/64]``,
    ``L_up [N, r]``, ``bias [N]`` or ``None`` (contiguous); validated by the op layer.
    ``config`` overrides :func:`pick_config`."""
    lead = xq.shape[:-1]
    K2 = xq.shape[-1]
    G = K2 // GROUP_BYTES
    N, R = qweight.shape[0], L_up.shape[1]
    xq2 = xq.reshape(-1, K2)  # views unless the leading dims cannot be flattened
    M = xq2.shape[0]
    xs2, la2 = xscale.reshape(M, G), lowrank_act.reshape(M, R)
    y = torch.empty(M, N, dtype=scales.dtype, device=xq.device)
    if M and N:
        config = config or pick_config(M)
        torch.library.wrap_triton(_w4a4_gemm_kernel)[_gemm_grid(M, N, config)](
            xq2, xs2, qweight, scales, la2, L_up, bias, y,
            M, N, G, R, *xq2.stride(), *xs2.stride(), *la2.stride(),
            UNSIGNED=unsigned, HAS_BIAS=bias is not None, BF16_EMULATED=_bf16_emulated(y.dtype),
            BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, BLOCK_R=BLOCK_R, GROUP_M=GROUP_M,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    return y.reshape(*lead, N)


def lowrank_w4a16_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, L_down: torch.Tensor, L_up: torch.Tensor,
    bias: Optional[torch.Tensor], *, config: Optional[Config] = None,
) -> torch.Tensor:
    """``y [..., N] = x·deq(qweight)ᵀ + (x·L_downᵀ)·L_upᵀ + bias`` in ``x``'s dtype.

    ``x [..., K]`` (any strides), ``qweight [N, K/2]``, ``scales [N, K/64]``,
    ``L_down [r, K]``, ``L_up [N, r]``, ``bias [N]`` or ``None`` (contiguous, ``x``'s
    dtype); validated by the op layer. Two launches when ``r > 0``: the down
    projection (float32 ``[M, r]``), then the GEMM with the up projection in its
    epilogue. ``config`` overrides :func:`pick_config` for the GEMM.
    """
    K = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M, N, R = x2.shape[0], qweight.shape[0], L_down.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y.reshape(*lead, N)
    t = torch.empty(M, R, dtype=torch.float32, device=x.device)
    if R:
        _quantize_launch(x2, L_down, t, None, None)
    config = config or pick_config(M)
    torch.library.wrap_triton(_w4a16_kernel)[_gemm_grid(M, N, config)](
        x2, qweight, scales, t, L_up, bias, y,
        M, N, K // GROUP_SIZE, R, *x2.stride(), *t.stride(),
        COMPUTE=_COMPUTE[x.dtype], HAS_BIAS=bias is not None, BF16_EMULATED=_bf16_emulated(x.dtype),
        BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, BLOCK_R=BLOCK_R, GROUP_M=GROUP_M,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y.reshape(*lead, N)


# --------------------------------------------------------------------------- compile check




def _case(case_id: str, kernel: object, types: dict[str, str], constexprs: dict[str, object],
          config: Config, tensor_cores: bool) -> CompileCase:
    """A build of ``kernel`` as a launch with contiguous operands gets it: unit strides
    are constexpr 1 (the JIT's specialisation), pointers and the row strides (multiples
    of 32 bytes: ``K`` is a multiple of 64) divisible by 16; other ints i32."""
    names = kernel.arg_names  # type: ignore[attr-defined]
    signature = {a: "constexpr" if a in constexprs else types.get(a, "i32") for a in names}
    aligned = tuple(a for a in names if a not in constexprs
                    and (signature[a].startswith("*") or a in ("stride_xm", "stride_xqm")))
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    return CompileCase(case_id, kernel, signature, constexprs, options, tensor_cores, aligned)


def compile_cases() -> Iterator[CompileCase]:
    """Every kernel × config × dtype (× signed/unsigned activations), as launched on
    contiguous operands with a low-rank branch and a bias.

    Ids: ``<kernel>-<config>-<dtype>[-unsigned]``. ``expects_tensor_cores`` holds for
    every build (each has a ``tl.dot`` in its K loop).
    """
    for compute in (tl.bfloat16, tl.float16, tl.float32):
        ptr = PTR[compute]
        dt = str(compute)
        for cfg in CONFIGS:
            common = dict(BF16_EMULATED=False, HAS_BIAS=True, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
                          BLOCK_R=BLOCK_R, GROUP_M=GROUP_M, stride_lar=1)
            types = dict(xq_ptr="*u8", xs_ptr="*fp32", qw_ptr="*u8", ws_ptr=ptr, la_ptr="*fp32",
                         lu_ptr=ptr, bias_ptr=ptr, y_ptr=ptr, x_ptr=ptr)
            for unsigned in (False, True):
                yield _case(f"w4a4-{cfg.name}-{dt}" + "-unsigned" * unsigned, _w4a4_gemm_kernel, types,
                            dict(common, UNSIGNED=unsigned, stride_xqk=1, stride_xsg=1), cfg, True)
            yield _case(f"w4a16-{cfg.name}-{dt}", _w4a16_kernel, types,
                        dict(common, COMPUTE=compute, stride_xk=1), cfg, True)
        for cfg in QUANT_CONFIGS:
            types = dict(x_ptr=ptr, smooth_ptr="*fp32", ld_ptr=ptr, xq_ptr="*u8", xs_ptr="*fp32",
                         la_ptr="*fp32")
            common = dict(HAS_LOWRANK=True, COMPUTE=compute, BF16_EMULATED=False, BLOCK_M=cfg.BLOCK_M,
                          BLOCK_R=BLOCK_R, stride_xk=1, stride_smooth=1)
            for unsigned in (False, True):
                yield _case(f"quantize-{cfg.name}-{dt}" + "-unsigned" * unsigned, _quantize_act_kernel,
                            types, dict(common, QUANTIZE=True, UNSIGNED=unsigned), cfg, True)
            # The down-projection pre-pass of lowrank_w4a16_linear (no quantisation outputs).
            yield _case(f"down-{cfg.name}-{dt}", _quantize_act_kernel, types,
                        dict(common, QUANTIZE=False, UNSIGNED=False, smooth_ptr=None, xq_ptr=None,
                             xs_ptr=None, stride_smooth=0), cfg, True)
