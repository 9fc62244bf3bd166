"""Triton backend of ``rsvd``: the products with ``A`` behind the randomized SVD.

The driver (``svdkernels.reference.rsvd.rsvd``) needs two kinds of pass over a
batch ``A [B, m, n]`` (see its :class:`~svdkernels.reference.rsvd.Passes`):

- ``matmul``: ``out[b] = op(A[b]) · X[b]``, ``op(A) = A`` or ``Aᵀ`` (a stride swap:
  ``A`` is never copied or transposed in memory, any strides work);
- ``sketch``: ``Y[b] = A[b] · Ω_b`` with a Gaussian ``Ω_b [n, width]`` generated
  inside the kernel by Philox, tile by tile, so it never touches memory.

Precision. Both read ``A`` (and ``X``) in whatever float dtype they are stored in,
round the tiles to the compute dtype in registers (bfloat16 / float16 / float32)
and feed ``tl.dot`` with float32 accumulation; the output is float32. float32
compute is 3xTF32 (``a·x ≈ a_lo·x_hi + a_hi·x_lo + a_hi·x_hi``, each product on the
TF32 tensor cores, ~21 correct bits), the decomposition behind triton's
``input_precision="tf32x3"`` but written out (see :func:`dot_acc`).

Gaussian test matrix. Element ``(j, c)`` of ``Ω_b`` is normal number ``c % 4`` made
from the Philox4x32-10 block (Random123's) with key ``seed`` mod 2⁶⁴ (``k0`` = low
word, ``k1`` = high word) and counter ``(j, c // 4, b, 0)``: normals 0 and 1 from
words (0, 1), normals 2 and 3 from words (2, 3), by the Box–Muller transform of
:func:`_box_muller`; then rounded to TF32 (11 significant bits, see
:func:`_gaussian_tile`). So ``Ω`` is a pure function of ``(seed, b, j, c)``:
independent of the width (a wider sketch extends a narrower one), batch elements
use distinct counters (independent streams of one key), and no index overflows
for ``n``, ``width`` and ``B`` below 2³². :func:`gaussian` materialises exactly this
``Ω``; tests/triton/test_rsvd_kernels.py recomputes it in plain Python.

Grid. A 1-D grid enumerates (K split, batch, row tile, column tile), column tile
fastest: the CTAs that share a row panel of ``A`` run together, so the panel comes
from HBM once and from L2 for the other column tiles, and the batch is not bound
by the 65535 limit of the second and third grid dimensions. K splits (partial sums
in a workspace, added by the launcher) give a small batch enough CTAs to fill a GPU.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from svdkernels.reference import rsvd as reference
from svdkernels.triton.common import CompileCase, PTR, check_device, dot_acc, interpreted, round_mantissa, sm_count



# --------------------------------------------------------------------------- kernels


@triton.jit
def _tile_coords(rows, cols, batch, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's (K split, batch, row tile, column tile); column tiles vary fastest."""
    pid = tl.program_id(0)
    n_col = tl.cdiv(cols, BLOCK_N)
    per_batch = tl.cdiv(rows, BLOCK_M) * n_col
    split = pid // (batch * per_batch)
    t = pid - split * (batch * per_batch)
    b = t // per_batch
    t -= b * per_batch
    return split, b, t // n_col, t % n_col


@triton.jit
def _box_muller(r_radius, r_angle):
    """Two independent N(0, 1) from two uniform uint32 words (float32 out).

    Radius ``sqrt(-2·ln u)`` with ``u = ((r_radius >> 8) + 1) / 2²⁴`` in (0, 1] (never
    log 0). Angle ``θ = (π/2)·(q + f)`` with quadrant ``q`` = the top 2 bits of
    ``r_angle`` and ``f`` = its next 24 bits / 2²⁴ - 1/2: sin and cos of
    ``(π/2)·f`` in [-π/4, π/4] by Taylor polynomials (error < 3e-8), then a quarter
    turn ``q`` times. Plain arithmetic, no libdevice: the precise ``sinf``/``cosf``
    carry a Payne–Hanek slow path (a local-memory table and a stack frame) that a
    bounded angle never needs, and the interpreter runs this code unchanged.
    """
    u = ((r_radius >> 8) + 1).to(tl.float32) * 5.9604644775390625e-08  # 2^-24
    radius = tl.sqrt(-1.3862943611198906 * tl.log2(u))  # -2·ln 2 · log2 u = -2·ln u
    f = ((r_angle >> 6) & 0xFFFFFF).to(tl.float32) * 5.9604644775390625e-08 - 0.5
    q = r_angle >> 30
    x = 1.5707963267948966 * f
    x2 = x * x
    sin = x * (1.0 + x2 * (-1.0 / 6 + x2 * (1.0 / 120 + x2 * (-1.0 / 5040 + x2 * (1.0 / 362880)))))
    cos = 1.0 + x2 * (-0.5 + x2 * (1.0 / 24 + x2 * (-1.0 / 720 + x2 * (1.0 / 40320))))
    # Rotate (cos x, sin x) by q quarter turns: q=1 -> (-sin, cos), q=2 -> (-cos, -sin), q=3 -> (sin, -cos).
    odd = (q & 1) == 1
    first = tl.where(odd, sin, cos)
    second = tl.where(odd, cos, sin)
    first = tl.where((q == 1) | (q == 2), -first, first)
    second = tl.where(q >= 2, -second, second)
    return radius * first, radius * second


@triton.jit
def _gaussian_tile(seed, batch, rows, groups):
    """``[len(rows), 4·len(groups)]`` float32 N(0, 1): ``Ω_batch[rows, 4·groups + r]``.

    One Philox4x32-10 call per 4 outputs (key ``seed``, counter ``(row, group, batch,
    0)``), Box–Muller on both pairs of words, interleaved so that column
    ``4g + r`` holds normal number ``r``.
    """
    zero = (rows[:, None] * 0 + groups[None, :] * 0).to(tl.uint32)
    c0 = zero + rows[:, None].to(tl.uint32)
    c1 = zero + groups[None, :].to(tl.uint32)
    c2 = zero + batch.to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, zero)
    n0, n1 = _box_muller(r0, r1)
    n2, n3 = _box_muller(r2, r3)
    # TF32 values (11 significant bits): exact in float16 and TF32, so fp32 compute
    # needs no hi/lo split of Ω (see dot_acc).
    return round_mantissa(tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3)), 13)


@triton.jit
def _store_tile(out_ptr, acc, b, tm, tn, rows, cols, stride_ob, stride_or, stride_oc,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store the float32 tile ``acc`` at (row tile ``tm``, column tile ``tn``) of ``out[b]``."""
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    # int64 tile origin, int32 offsets inside the tile: one matrix may pass 2^31 elements.
    base = b.to(tl.int64) * stride_ob + (tm * BLOCK_M).to(tl.int64) * stride_or \
        + (tn * BLOCK_N).to(tl.int64) * stride_oc
    ptrs = out_ptr + base + rm[:, None] * stride_or + rn[None, :] * stride_oc
    mask = (tm * BLOCK_M + rm < rows)[:, None] & (tn * BLOCK_N + rn < cols)[None, :]
    tl.store(ptrs, acc, mask=mask)


@triton.jit
def _matmul_kernel(
    a_ptr, x_ptr, out_ptr,
    batch, rows, cols, inner, k_split,
    stride_ab, stride_ar, stride_ai,
    stride_xb, stride_xi, stride_xc,
    stride_os, stride_ob, stride_or, stride_oc,
    COMPUTE: tl.constexpr, BF16_EMULATED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out[s, b] = op(A)[b, :, K_s] · X[b, K_s, :]``: op(A) ``[batch, rows, inner]`` (A or
    Aᵀ, by its strides), X ``[batch, inner, cols]``, out ``[splits, batch, rows, cols]``
    float32; split ``s`` reduces ``K_s = [s·k_split, (s+1)·k_split)`` (the launcher sums)."""
    split, b, tm, tn = _tile_coords(rows, cols, batch, BLOCK_M, BLOCK_N)
    k_start = split * k_split
    k_len = tl.minimum(inner - k_start, k_split)
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    row_ok = (tm * BLOCK_M + rm < rows)[:, None]
    col_ok = (tn * BLOCK_N + rn < cols)[None, :]
    a_ptrs = a_ptr + b.to(tl.int64) * stride_ab + (tm * BLOCK_M).to(tl.int64) * stride_ar \
        + k_start.to(tl.int64) * stride_ai + rm[:, None] * stride_ar + rk[None, :] * stride_ai
    x_ptrs = x_ptr + b.to(tl.int64) * stride_xb + (tn * BLOCK_N).to(tl.int64) * stride_xc \
        + k_start.to(tl.int64) * stride_xi + rk[:, None] * stride_xi + rn[None, :] * stride_xc
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(k_len, BLOCK_K)):
        k_left = k_len - k * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok & (rk[None, :] < k_left), other=0.0)
        x = tl.load(x_ptrs, mask=(rk[:, None] < k_left) & col_ok, other=0.0)
        acc = dot_acc(a, x, acc, COMPUTE, BF16_EMULATED, False)
        a_ptrs += BLOCK_K * stride_ai
        x_ptrs += BLOCK_K * stride_xi
    _store_tile(out_ptr + split.to(tl.int64) * stride_os, acc, b, tm, tn, rows, cols,
                stride_ob, stride_or, stride_oc, BLOCK_M, BLOCK_N)


@triton.jit(do_not_specialize=["seed"])
def _sketch_kernel(
    a_ptr, seed, out_ptr,
    batch, rows, width, inner, k_split,
    stride_ab, stride_am, stride_an,
    stride_os, stride_ob, stride_om, stride_oc,
    COMPUTE: tl.constexpr, BF16_EMULATED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``Y[s, b] = A[b, :, K_s] · Ω_b[K_s, :]``: A ``[batch, rows, inner]``, Ω_b ``[inner,
    width]`` made by Philox in registers (never stored), Y ``[splits, batch, rows,
    width]`` float32; split ``s`` reduces ``K_s = [s·k_split, (s+1)·k_split)``."""
    split, b, tm, tn = _tile_coords(rows, width, batch, BLOCK_M, BLOCK_N)
    k_start = split * k_split
    k_len = tl.minimum(inner - k_start, k_split)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    groups = tn * (BLOCK_N // 4) + tl.arange(0, BLOCK_N // 4)
    row_ok = (tm * BLOCK_M + rm < rows)[:, None]
    a_ptrs = a_ptr + b.to(tl.int64) * stride_ab + (tm * BLOCK_M).to(tl.int64) * stride_am \
        + k_start.to(tl.int64) * stride_an + rm[:, None] * stride_am + rk[None, :] * stride_an
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(k_len, BLOCK_K)):
        a = tl.load(a_ptrs, mask=row_ok & (rk[None, :] < k_len - k * BLOCK_K), other=0.0)
        # Rows of Ω past the split meet the zero-filled columns of `a`: no mask needed.
        omega = _gaussian_tile(seed, b, k_start + k * BLOCK_K + rk, groups)
        acc = dot_acc(a, omega, acc, COMPUTE, BF16_EMULATED, True)
        a_ptrs += BLOCK_K * stride_an
    _store_tile(out_ptr + split.to(tl.int64) * stride_os, acc, b, tm, tn, rows, width,
                stride_ob, stride_om, stride_oc, BLOCK_M, BLOCK_N)


@triton.jit(do_not_specialize=["seed"])
def _gaussian_kernel(
    out_ptr, seed, batch, n, width, stride_ob, stride_oj, stride_oc,
    BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``out[b] = Ω_b`` ``[n, width]`` float32, the matrix ``_sketch_kernel`` multiplies by."""
    _, b, tj, tc = _tile_coords(n, width, batch, BLOCK_J, BLOCK_C)
    omega = _gaussian_tile(seed, b, tj * BLOCK_J + tl.arange(0, BLOCK_J),
                           tc * (BLOCK_C // 4) + tl.arange(0, BLOCK_C // 4))
    _store_tile(out_ptr, omega, b, tj, tc, n, width, stride_ob, stride_oj, stride_oc, BLOCK_J, BLOCK_C)


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class Config:
    """Tile sizes and launch options of ``_matmul_kernel`` / ``_sketch_kernel``."""

    name: str
    BLOCK_M: int
    BLOCK_N: int  # a multiple of 4 (the sketch makes Ω four columns per Philox call)
    BLOCK_K: int
    num_warps: int
    num_stages: int


# The passes are thin (width w = rank + oversample, typically 16..256) and so
# bandwidth bound: a config covers w with one column tile (A read once) and keeps
# BLOCK_M large against BLOCK_N, since every row tile re-reads its X panel from L2.
# BLOCK_K is small because each thread holds its share of the BLOCK_M x BLOCK_K
# operand of A in registers: float32 when A is stored in float32, and twice over
# (hi and lo) in float32 compute. The sketch makes its Ω tile with Philox in
# registers; BLOCK_M = 256 spreads that work over more rows of A. Every config
# compiles without spills for bf16, fp16 and fp32 compute on sm_80 and sm_90
# (tests/triton/test_compile.py; the most, 249 registers, is matmul w128 rounding
# float32 A to bf16 on sm_80).
CONFIGS: dict[str, tuple[Config, ...]] = {
    "matmul": (
        Config("w32", BLOCK_M=128, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=4),
        Config("w64", BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=4),
        Config("w128", BLOCK_M=128, BLOCK_N=128, BLOCK_K=16, num_warps=8, num_stages=4),
    ),
    "sketch": (
        Config("w32", BLOCK_M=256, BLOCK_N=32, BLOCK_K=16, num_warps=8, num_stages=4),
        Config("w64", BLOCK_M=256, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=4),
        Config("w128", BLOCK_M=128, BLOCK_N=128, BLOCK_K=16, num_warps=8, num_stages=4),
    ),
}

_GAUSSIAN_BLOCK = (32, 32)  # (BLOCK_J, BLOCK_C) of the test-only materialiser

_COMPUTE: dict[torch.dtype, tl.dtype] = {
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float32: tl.float32,
}


def pick_config(kernel: str, width: int) -> Config:
    """The narrowest config of ``kernel`` ("matmul" or "sketch") whose column tile
    covers ``width`` (the widest beyond: several column tiles)."""
    configs = CONFIGS[kernel]
    for cfg in configs:
        if width <= cfg.BLOCK_N:
            return cfg
    return configs[-1]


# --------------------------------------------------------------------------- launchers



def _compute_dtype(dtype: torch.dtype) -> tl.dtype:
    if dtype not in _COMPUTE:
        raise TypeError(f"dtype: expected one of {tuple(_COMPUTE)}, got {dtype}")
    return _COMPUTE[dtype]


def _check_operand(name: str, t: torch.Tensor) -> None:
    if t.dim() != 3:
        raise ValueError(f"{name}: expected a 3-D tensor [B, rows, cols], got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    check_device(name, t)


def _launch_options(dtype: torch.dtype, config: Config) -> dict[str, object]:
    compute = _compute_dtype(dtype)
    return dict(
        COMPUTE=compute,
        BF16_EMULATED=compute == tl.bfloat16 and interpreted(),
        BLOCK_M=config.BLOCK_M,
        BLOCK_N=config.BLOCK_N,
        BLOCK_K=config.BLOCK_K,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def _grid(batch: int, rows: int, cols: int, block_m: int, block_n: int) -> int:
    """Output tiles of a ``[batch, rows, cols]`` result."""
    return batch * triton.cdiv(rows, block_m) * triton.cdiv(cols, block_n)


_MIN_K_BLOCKS = 8  # K blocks per split at least, to amortise the pipeline's fill


def _auto_splits(tiles: int, inner: int, block_k: int, device: torch.device) -> int:
    """K splits that give a small batch enough CTAs to fill the GPU (about 2 per SM).

    A single ``[4096, 4096]`` matrix has 32 row tiles of 128: a quarter of an H100's
    132 SMs, each streaming its panel alone. Splitting the reduction over K fills
    the rest; partial sums go to a workspace that the launcher adds up (no atomics,
    so results stay bitwise reproducible).
    """
    if device.type != "cuda":
        return 1
    sms = sm_count(device)
    if tiles >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, tiles), inner // (_MIN_K_BLOCKS * block_k)))


def _run(
    kernel: object, head: tuple, tail: tuple, *, batch: int, rows: int, cols: int, inner: int,
    device: torch.device, dtype: torch.dtype, config: Config, split_k: int | None,
) -> torch.Tensor:
    """Launch a GEMM-shaped kernel as ``kernel(*head, workspace, batch, rows, cols, inner,
    k_split, *tail, *workspace strides)``; return the float32 ``[batch, rows, cols]`` sum
    over the workspace's K splits."""
    options = _launch_options(dtype, config)
    tiles = _grid(batch, rows, cols, config.BLOCK_M, config.BLOCK_N)
    splits = split_k or _auto_splits(tiles, inner, config.BLOCK_K, device)
    # Whole K blocks per split; recount so that no split is empty.
    k_split = max(triton.cdiv(triton.cdiv(inner, splits), config.BLOCK_K), 1) * config.BLOCK_K
    splits = max(triton.cdiv(inner, k_split), 1)
    work = torch.empty(splits, batch, rows, cols, dtype=torch.float32, device=device)
    if work.numel() == 0:
        return work.sum(0)
    torch.library.wrap_triton(kernel)[(splits * tiles,)](
        *head, work, batch, rows, cols, inner, k_split, *tail, *work.stride(), **options
    )
    return work[0] if splits == 1 else work.sum(0)


def _philox_key(seed: int) -> int:
    """``seed`` mod 2⁶⁴ as the int64 with the same bits (what the kernel's key reads)."""
    seed = int(seed) % 2**64
    return seed - 2**64 if seed >= 2**63 else seed


def matmul(
    A: torch.Tensor,
    X: torch.Tensor,
    *,
    transpose: bool,
    dtype: torch.dtype,
    config: Config | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """``[B, rows, w]`` float32 ``= op(A)·X``, ``op(A) = Aᵀ`` if ``transpose`` else ``A``.

    ``A [B, m, n]`` and ``X [B, n or m, w]`` in any float dtype and any strides (read
    as they are, never copied); operands rounded to ``dtype`` in registers, float32
    accumulation. ``config`` and ``split_k`` override :func:`pick_config` and the
    automatic K split (tests use them to cover several tiles and splits).
    """
    _check_operand("A", A)
    _check_operand("X", X)
    B, m, n = A.shape
    rows, inner = (n, m) if transpose else (m, n)
    if X.shape[0] != B or X.shape[1] != inner:
        raise ValueError(
            f"X: expected shape [{B}, {inner}, w] for A of shape {tuple(A.shape)} "
            f"(transpose={transpose}), got {tuple(X.shape)}"
        )
    if X.device != A.device:
        raise ValueError(f"X: expected device {A.device} (that of A), got {X.device}")
    w = X.shape[2]
    stride_ab, stride_am, stride_an = A.stride()
    # op(A) = Aᵀ is A with its two matrix strides swapped.
    a_strides = (stride_ab, stride_an, stride_am) if transpose else (stride_ab, stride_am, stride_an)
    return _run(
        _matmul_kernel, (A, X), (*a_strides, *X.stride()), batch=B, rows=rows, cols=w,
        inner=inner, device=A.device, dtype=dtype,
        config=config or pick_config("matmul", w), split_k=split_k,
    )


def sketch(
    A: torch.Tensor,
    width: int,
    seed: int,
    dtype: torch.dtype,
    *,
    config: Config | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """``Y [B, m, width]`` float32 ``= A·Ω`` with ``Ω = gaussian(seed, B, n, width)``.

    ``A [B, m, n]`` in any float dtype and strides; ``Ω`` is generated in registers
    (never stored); operands rounded to ``dtype``, float32 accumulation.
    """
    _check_operand("A", A)
    if width < 0:
        raise ValueError(f"width: expected a non-negative int, got {width}")
    B, m, n = A.shape
    config = config or pick_config("sketch", width)
    if config.BLOCK_N % 4:
        raise ValueError(f"config: BLOCK_N must be a multiple of 4 for the sketch, got {config.BLOCK_N}")
    return _run(
        _sketch_kernel, (A, _philox_key(seed)), A.stride(), batch=B, rows=m, cols=width,
        inner=n, device=A.device, dtype=dtype, config=config, split_k=split_k,
    )


def gaussian(seed: int, batch: int, n: int, width: int, device: torch.device | str) -> torch.Tensor:
    """``Ω [batch, n, width]`` float32: exactly the test matrices :func:`sketch` uses (tests only)."""
    out = torch.empty(batch, n, width, dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out
    block_j, block_c = _GAUSSIAN_BLOCK
    torch.library.wrap_triton(_gaussian_kernel)[(_grid(batch, n, width, block_j, block_c),)](
        out, _philox_key(seed), batch, n, width, *out.stride(), BLOCK_J=block_j, BLOCK_C=block_c
    )
    return out


class TritonPasses:
    """:class:`~svdkernels.reference.rsvd.Passes` with the Triton kernels above."""

    # 16-bit products come back as the kernels' float32 accumulators, so the driver
    # keeps the last two passes of 16-bit input in 16 bits (projection split hi/lo).
    exact_16bit_products = True

    def prepare(self, A: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # The kernels round A to `dtype` tile by tile in registers: no cast copy.
        return A

    def sketch(self, A: torch.Tensor, width: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
        return sketch(A, width, seed, dtype)

    def matmul(
        self, A: torch.Tensor, X: torch.Tensor, *, transpose: bool, dtype: torch.dtype
    ) -> torch.Tensor:
        return matmul(A, X, transpose=transpose, dtype=dtype)


TRITON_PASSES = TritonPasses()


def rsvd(
    A: torch.Tensor,
    rank: int,
    *,
    oversample: int,
    n_iter: int,
    seed: int,
    sketch_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized SVD of ``A [..., m, n]`` with the passes on Triton kernels.

    Returns ``U [..., m, rank]``, ``S [..., rank]``, ``Vh [..., rank, n]`` float32 (see
    ``svdkernels.reference.rsvd.rsvd``, which does everything but the passes).
    """
    return reference.rsvd(
        A, rank, oversample=oversample, n_iter=n_iter, seed=seed,
        sketch_dtype=sketch_dtype, passes=TRITON_PASSES,
    )


# --------------------------------------------------------------------------- compile check



# Operand storage per compute dtype, the costliest realistic case of each: bf16
# compute on float32 A (the sketch passes of a float32 input: A converted in
# registers, twice the shared memory of 16-bit tiles), fp16 compute on fp16 A, and
# fp32 (tf32x3) on fp32. X is float32 (the driver's bases), as is the output.
_STORAGE = {tl.bfloat16: tl.float32, tl.float16: tl.float16, tl.float32: tl.float32}


def _cases(name: str, kernel: object, types: dict[str, str], constexprs: dict[str, object],
           options: dict[str, int], tensor_cores: bool) -> Iterator[CompileCase]:
    """The build of ``kernel`` for any operands and the one for 16-aligned operands.

    Arguments not in ``types`` or ``constexprs`` are i32. "aligned" assumes 16-byte
    aligned pointers and strides that are multiples of 16 (the JIT's variant for
    shapes like 4096 x 4096); "any" assumes nothing (shapes like 100 x 37).
    """
    names = kernel.arg_names  # type: ignore[attr-defined]
    signature = {a: "constexpr" if a in constexprs else types.get(a, "i32") for a in names}
    aligned = tuple(a for a in names if a not in constexprs
                    and (signature[a].startswith("*") or a.startswith("stride")))
    yield CompileCase(f"{name}-any", kernel, signature, constexprs, options, tensor_cores)
    yield CompileCase(f"{name}-aligned", kernel, signature, constexprs, options, tensor_cores, aligned)


def compile_cases() -> Iterator[CompileCase]:
    """Every kernel × config × compute dtype, as the compile check builds them.

    Unit strides are constexpr 1, as the JIT specialises them for contiguous
    operands; each build comes without and with 16-divisibility (see
    :func:`_cases`). The matmul is built for A (unit stride along the reduction)
    and for Aᵀ (unit stride along the rows).
    """
    for compute in (tl.bfloat16, tl.float16, tl.float32):
        a_type = PTR[_STORAGE[compute]]
        for kernel_name, configs in CONFIGS.items():
            for cfg in configs:
                const = dict(COMPUTE=compute, BF16_EMULATED=False, BLOCK_M=cfg.BLOCK_M,
                             BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, stride_oc=1)
                options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                name = f"{kernel_name}-{cfg.name}-{compute}"
                if kernel_name == "sketch":
                    types = dict(a_ptr=a_type, out_ptr="*fp32", seed="i64")
                    yield from _cases(name, _sketch_kernel, types, dict(const, stride_an=1), options, True)
                    continue
                types = dict(a_ptr=a_type, x_ptr="*fp32", out_ptr="*fp32")
                for op, unit in (("A", "stride_ai"), ("At", "stride_ar")):
                    yield from _cases(f"{name}-{op}", _matmul_kernel, types,
                                      dict(const, stride_xc=1, **{unit: 1}), options, True)
    block_j, block_c = _GAUSSIAN_BLOCK
    const = dict(BLOCK_J=block_j, BLOCK_C=block_c, stride_oc=1)
    yield from _cases("gaussian", _gaussian_kernel, dict(out_ptr="*fp32", seed="i64"), const,
                      dict(num_warps=4, num_stages=1), False)
