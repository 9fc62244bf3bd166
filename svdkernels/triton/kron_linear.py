"""Triton backend of ``kron_linear``: ``y = scale · x · (Σ_i A_i ⊗ B_i)ᵀ``, never forming the product.

Shapes: ``x [N, a2·b2]``, ``A [r, a1, a2]``, ``B [r, b1, b2]``, ``y [N, a1·b1]``. A token's
row is the row-major ``a2×b2`` matrix ``X[n]`` (``x[n, k·b2 + c] = X[n, k, c]``), and

    Y[n] = scale · Σ_i A_i · X[n] · B_iᵀ        (a1×b1, ``y[n, p·b1 + q] = Y[n, p, q]``)

Kernels
-------
- :func:`_kron_linear_kernel` (forward, and ``∂x`` as ``kron_linear(G, Aᵀ, Bᵀ)``, the
  transposes being stride swaps). A program owns ``BLOCK_T`` tokens and an output
  tile of ``BLOCK_A1`` rows ``p`` × ``BLOCK_B1`` columns ``q`` of every ``Y[n]``. For each
  ``i`` and each chunk of ``BLOCK_A2`` rows ``k`` of ``X[n]``:

  1. ``Z[(n,k), q] = Σ_c X[(n,k), c] · B_i[q, c]``, a ``tl.dot`` of ``[BLOCK_T·BLOCK_A2,
     BLOCK_B2]`` by ``[BLOCK_B2, BLOCK_B1]``, looping over ``b2`` in ``BLOCK_B2`` chunks.
     The token block is stacked into the rows (``M``), so the dot is tall even when
     the factors are small. ``X`` is read in its natural layout.
  2. ``Z`` is permuted in registers to rows ``(n, q)``: ``Zt[(n,q), k]`` (through
     shared memory; the one data movement that two contractions over different
     axes of ``X[n]`` cannot avoid).
  3. ``Y[(n,q), p] += Σ_k Zt[(n,q), k] · A_i[p, k]``, a ``tl.dot`` of ``[BLOCK_T·BLOCK_B1,
     BLOCK_A2]`` by ``[BLOCK_A2, BLOCK_A1]``: tokens in ``M`` again (Hopper's ``wgmma``
     wants ``M ≥ 64``), a float32 accumulator that lives across all ``i`` and ``k``.

  The accumulator is scaled, rounded to ``y``'s dtype and stored once. Programs with
  the same token block are adjacent in the grid (output tiles vary fastest), so the
  ``X`` panel comes from HBM once and from L2 for the other tiles. ``Z`` is recomputed
  per ``A1`` tile: ``cdiv(a1, BLOCK_A1)`` times, once when the config covers ``a1``.

- :func:`_kron_grad_a_kernel`: ``∂A_i[p, k] = scale · Σ_n Σ_q G[n,p,q] · Z_i[n,k,q]`` with the
  forward's ``Z`` (steps 1-2), then ``[BLOCK_A1, BLOCK_T·BLOCK_B1] · [BLOCK_T·BLOCK_B1,
  BLOCK_A2]``: the token block and the ``q`` chunk form the reduction. A program owns
  one ``(i, p tile, k tile)`` and a contiguous range of token blocks (a split).
- :func:`_kron_grad_b_kernel`: ``∂B_i[q, c] = scale · Σ_n Σ_k H_i[n,q,k] · X[n,k,c]`` with
  ``H_i[(n,q), k] = Σ_p G[n,p,q] · A_i[p,k]`` (a dot with tokens in ``M``), permuted to
  ``[q, (n,k)]`` so that the second dot meets ``X`` in its natural layout. A program
  owns one ``(i, q tile, c tile)`` and a split of the token blocks.

  Token splits write float32 partial sums to a workspace ``[splits, r, rows, cols]``
  that the launcher adds in torch: deterministic, no atomics. The splits exist only
  to fill the GPU when ``r`` × the factor tiles is small against the SM count.

Tiling and sizes. Every loop is tiled, so factor dims of any size work: the
contractions (``a2``, ``b2`` in the forward kernel; the tokens and the contracted
factor dims in the gradients) are looped over in chunks, the output dims (``a1``,
``b1``; the gradients' rows and columns) are spread over programs, and a program's
registers and shared memory depend on its config only. Dims that are not powers of
two are zero-padded by masked loads; a dim below 16 still costs a 16-wide tile
(``tl.dot``'s minimum). :func:`pick_config` chooses by the largest factor dim
(classes ≤ 16, ≤ 32, ≤ 64 and beyond; see :data:`CONFIGS`). Offsets inside a token's
row and inside the factors are int32 (``a1·b1``, ``a2·b2`` and ``r·a1·a2``, ``r·b1·b2``
below 2³¹), token offsets int64.

Precision. Operands are read in their stored dtype and rounded in registers to the
compute dtype, that of ``x``: bfloat16 / float16 feed ``tl.dot`` with float32
accumulation; float32 is 3xTF32 (``dot_acc`` of :mod:`svdkernels.triton.common`,
~21 correct bits per product, results within ~1e-5 relative of a float32
reference). With 16-bit inputs the intermediate (``Z``, ``H``) is rounded once to the
compute dtype before the second dot, exactly as two 16-bit GEMMs in torch would
store it; everything else accumulates in float32 and only ``y`` is rounded to the
input dtype (gradients: float32 until the final cast to ``A``'s / ``B``'s dtype).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from svdkernels.triton.common import CompileCase, PTR, check_device, dot_acc, interpreted, round_mantissa, sm_count



# --------------------------------------------------------------------------- kernels


@triton.jit
def _to_compute(z, COMPUTE: tl.constexpr, BF16_EMULATED: tl.constexpr):
    """The float32 intermediate ``z`` rounded (to nearest even) to the compute dtype.

    Under the interpreter's bfloat16 emulation the values are rounded but kept in
    float32 (its float32->bfloat16 cast truncates; see ``dot_acc``)."""
    if BF16_EMULATED:
        z = round_mantissa(z, 16)
    elif COMPUTE != tl.float32:
        z = z.to(COMPUTE)
    return z


@triton.jit
def _rows_swap_inner(z, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr):
    """``z [D0·D1, D2]`` with rows ``(d0, d1)`` -> ``[D0·D2, D1]`` with rows ``(d0, d2)``."""
    return tl.reshape(tl.permute(tl.reshape(z, (D0, D1, D2)), (0, 2, 1)), (D0 * D2, D1))


@triton.jit
def _rows_to_cols(z, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr):
    """``z [D0·D1, D2]`` with rows ``(d0, d1)`` -> ``[D1, D0·D2]`` with columns ``(d0, d2)``."""
    return tl.reshape(tl.permute(tl.reshape(z, (D0, D1, D2)), (1, 0, 2)), (D1, D0 * D2))


@triton.jit
def _x_tile(x_tok, n_ok, k, c, A2, B2, stride_xn, stride_xc, BLOCK_A2: tl.constexpr):
    """``X[(n,k), c]`` ``[BLOCK_T·BLOCK_A2, BLOCK_B2]`` of the token block at ``x_tok``:
    row ``t`` is token ``t // BLOCK_A2``, row ``k[t]`` of its ``a2×b2`` matrix; zero
    outside the tokens (``n_ok``), ``a2`` and ``b2``."""
    t = tl.arange(0, k.shape[0])
    ptrs = x_tok + (t // BLOCK_A2)[:, None] * stride_xn + (k * B2)[:, None] * stride_xc \
        + c[None, :] * stride_xc
    return tl.load(ptrs, mask=(n_ok & (k < A2))[:, None] & (c < B2)[None, :], other=0.0)


@triton.jit
def _kron_linear_kernel(
    x_ptr, a_ptr, b_ptr, y_ptr, scale,
    N, R, A1, A2, B1, B2,
    stride_xn, stride_xc,
    stride_ar, stride_a1, stride_a2,
    stride_br, stride_b1, stride_b2,
    stride_yn,
    COMPUTE: tl.constexpr, BF16_EMULATED: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_A1: tl.constexpr, BLOCK_A2: tl.constexpr,
    BLOCK_B1: tl.constexpr, BLOCK_B2: tl.constexpr,
):
    """``y[n, p·b1 + q] = scale · Σ_i (A_i · X[n] · B_iᵀ)[p, q]`` for ``BLOCK_T`` tokens and a
    ``BLOCK_A1 × BLOCK_B1`` tile of ``(p, q)``; ``y [N, a1·b1]`` with unit column stride."""
    pid = tl.program_id(0)
    n_q = tl.cdiv(B1, BLOCK_B1)
    per_block = tl.cdiv(A1, BLOCK_A1) * n_q
    tb = pid // per_block
    tp = (pid % per_block) // n_q
    tq = pid % n_q
    n0 = tb * BLOCK_T

    # Rows (n, k) of the X / Z tiles.
    rx = tl.arange(0, BLOCK_T * BLOCK_A2)
    xk = rx % BLOCK_A2
    x_n_ok = n0 + rx // BLOCK_A2 < N
    x_tok = x_ptr + n0.to(tl.int64) * stride_xn
    rc = tl.arange(0, BLOCK_B2)
    rk = tl.arange(0, BLOCK_A2)
    q = tq * BLOCK_B1 + tl.arange(0, BLOCK_B1)
    p = tp * BLOCK_A1 + tl.arange(0, BLOCK_A1)

    acc = tl.zeros((BLOCK_T * BLOCK_B1, BLOCK_A1), dtype=tl.float32)
    for i in range(0, R):
        a_i = a_ptr + i * stride_ar  # factors are small: int32 offsets
        b_i = b_ptr + i * stride_br
        for k0 in range(0, A2, BLOCK_A2):
            z = tl.zeros((BLOCK_T * BLOCK_A2, BLOCK_B1), dtype=tl.float32)
            for c0 in range(0, B2, BLOCK_B2):
                c = c0 + rc
                xt = _x_tile(x_tok, x_n_ok, k0 + xk, c, A2, B2, stride_xn, stride_xc, BLOCK_A2)
                # B_iᵀ[c, q]
                bt = tl.load(b_i + c[:, None] * stride_b2 + q[None, :] * stride_b1,
                             mask=(c < B2)[:, None] & (q < B1)[None, :], other=0.0)
                z = dot_acc(xt, bt, z, COMPUTE, BF16_EMULATED, False)
            zt = _rows_swap_inner(_to_compute(z, COMPUTE, BF16_EMULATED), BLOCK_T, BLOCK_A2, BLOCK_B1)
            k = k0 + rk
            # A_iᵀ[k, p]
            at = tl.load(a_i + k[:, None] * stride_a2 + p[None, :] * stride_a1,
                         mask=(k < A2)[:, None] & (p < A1)[None, :], other=0.0)
            acc = dot_acc(zt, at, acc, COMPUTE, BF16_EMULATED, False)

    acc = acc * scale
    if BF16_EMULATED:
        acc = round_mantissa(acc, 16)  # the interpreter's cast would truncate
    # Rows (n, q) of the accumulator, columns p.
    ry = tl.arange(0, BLOCK_T * BLOCK_B1)
    yq = tq * BLOCK_B1 + ry % BLOCK_B1
    y_ptrs = y_ptr + n0.to(tl.int64) * stride_yn + (ry // BLOCK_B1)[:, None] * stride_yn \
        + p[None, :] * B1 + yq[:, None]
    mask = ((n0 + ry // BLOCK_B1 < N) & (yq < B1))[:, None] & (p < A1)[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_coords(R, rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's (split, factor i, row tile, column tile); column tiles vary fastest."""
    pid = tl.program_id(0)
    n_col = tl.cdiv(cols, BLOCK_C)
    per_i = tl.cdiv(rows, BLOCK_R) * n_col
    split = pid // (R * per_i)
    t = pid % (R * per_i)
    return split, t // per_i, (t % per_i) // n_col, t % n_col


@triton.jit
def _kron_grad_a_kernel(
    x_ptr, g_ptr, b_ptr, out_ptr, scale,
    N, R, A1, A2, B1, B2, blocks_per_split,
    stride_xn, stride_xc,
    stride_gn, stride_gc,
    stride_br, stride_b1, stride_b2,
    stride_os, stride_or, stride_o1, stride_o2,
    COMPUTE: tl.constexpr, BF16_EMULATED: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_A1: tl.constexpr, BLOCK_A2: tl.constexpr,
    BLOCK_B1: tl.constexpr, BLOCK_B2: tl.constexpr,
):
    """``out[s, i, p, k] = scale · Σ_{n ∈ split s} (G[n] · B_i · X[n]ᵀ)[p, k]`` float32, for a
    ``BLOCK_A1 × BLOCK_A2`` tile of ``(p, k)``; split ``s`` holds token blocks
    ``[s·blocks_per_split, (s+1)·blocks_per_split)`` of ``BLOCK_T`` tokens."""
    split, i, tp, tk = _split_coords(R, A1, A2, BLOCK_A1, BLOCK_A2)
    rx = tl.arange(0, BLOCK_T * BLOCK_A2)
    xk = tk * BLOCK_A2 + rx % BLOCK_A2
    rc = tl.arange(0, BLOCK_B2)
    rq = tl.arange(0, BLOCK_B1)
    rg = tl.arange(0, BLOCK_T * BLOCK_B1)  # columns (n, q) of the G tile
    p = tp * BLOCK_A1 + tl.arange(0, BLOCK_A1)
    b_i = b_ptr + i.to(tl.int64) * stride_br

    acc = tl.zeros((BLOCK_A1, BLOCK_A2), dtype=tl.float32)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(N, BLOCK_T))
    for tb in range(first, last):
        n0 = tb * BLOCK_T
        x_tok = x_ptr + tl.cast(n0, tl.int64) * stride_xn  # (a loop index is an int when interpreted)
        g_tok = g_ptr + tl.cast(n0, tl.int64) * stride_gn
        x_n_ok = n0 + rx // BLOCK_A2 < N
        g_n_ok = n0 + rg // BLOCK_B1 < N
        for q0 in range(0, B1, BLOCK_B1):
            q = q0 + rq
            z = tl.zeros((BLOCK_T * BLOCK_A2, BLOCK_B1), dtype=tl.float32)
            for c0 in range(0, B2, BLOCK_B2):
                c = c0 + rc
                xt = _x_tile(x_tok, x_n_ok, xk, c, A2, B2, stride_xn, stride_xc, BLOCK_A2)
                bt = tl.load(b_i + c[:, None] * stride_b2 + q[None, :] * stride_b1,
                             mask=(c < B2)[:, None] & (q < B1)[None, :], other=0.0)
                z = dot_acc(xt, bt, z, COMPUTE, BF16_EMULATED, False)
            zt = _rows_swap_inner(_to_compute(z, COMPUTE, BF16_EMULATED), BLOCK_T, BLOCK_A2, BLOCK_B1)
            # G[p, (n, q)]
            gq = q0 + rg % BLOCK_B1
            g = tl.load(g_tok + (rg // BLOCK_B1)[None, :] * stride_gn
                        + (p[:, None] * B1 + gq[None, :]) * stride_gc,
                        mask=(p < A1)[:, None] & (g_n_ok & (gq < B1))[None, :], other=0.0)
            acc = dot_acc(g, zt, acc, COMPUTE, BF16_EMULATED, False)

    k = tk * BLOCK_A2 + tl.arange(0, BLOCK_A2)
    out = out_ptr + split.to(tl.int64) * stride_os + i.to(tl.int64) * stride_or
    tl.store(out + p[:, None] * stride_o1 + k[None, :] * stride_o2, acc * scale,
             mask=(p < A1)[:, None] & (k < A2)[None, :])


@triton.jit
def _kron_grad_b_kernel(
    x_ptr, g_ptr, a_ptr, out_ptr, scale,
    N, R, A1, A2, B1, B2, blocks_per_split,
    stride_xn, stride_xc,
    stride_gn, stride_gc,
    stride_ar, stride_a1, stride_a2,
    stride_os, stride_or, stride_o1, stride_o2,
    COMPUTE: tl.constexpr, BF16_EMULATED: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_A1: tl.constexpr, BLOCK_A2: tl.constexpr,
    BLOCK_B1: tl.constexpr, BLOCK_B2: tl.constexpr,
):
    """``out[s, i, q, c] = scale · Σ_{n ∈ split s} (G[n]ᵀ · A_i · X[n])[q, c]`` float32, for a
    ``BLOCK_B1 × BLOCK_B2`` tile of ``(q, c)``; splits as in ``_kron_grad_a_kernel``."""
    split, i, tq, tc = _split_coords(R, B1, B2, BLOCK_B1, BLOCK_B2)
    rx = tl.arange(0, BLOCK_T * BLOCK_A2)
    rk = tl.arange(0, BLOCK_A2)
    rp = tl.arange(0, BLOCK_A1)
    rg = tl.arange(0, BLOCK_T * BLOCK_B1)  # rows (n, q) of the G tile
    gq = tq * BLOCK_B1 + rg % BLOCK_B1
    q = tq * BLOCK_B1 + tl.arange(0, BLOCK_B1)
    c = tc * BLOCK_B2 + tl.arange(0, BLOCK_B2)
    a_i = a_ptr + i.to(tl.int64) * stride_ar

    acc = tl.zeros((BLOCK_B1, BLOCK_B2), dtype=tl.float32)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(N, BLOCK_T))
    for tb in range(first, last):
        n0 = tb * BLOCK_T
        x_tok = x_ptr + tl.cast(n0, tl.int64) * stride_xn  # (a loop index is an int when interpreted)
        g_tok = g_ptr + tl.cast(n0, tl.int64) * stride_gn
        x_n_ok = n0 + rx // BLOCK_A2 < N
        g_row_ok = (n0 + rg // BLOCK_B1 < N) & (gq < B1)
        for k0 in range(0, A2, BLOCK_A2):
            k = k0 + rk
            h = tl.zeros((BLOCK_T * BLOCK_B1, BLOCK_A2), dtype=tl.float32)
            for p0 in range(0, A1, BLOCK_A1):
                p = p0 + rp
                # G[(n, q), p]
                g = tl.load(g_tok + (rg // BLOCK_B1)[:, None] * stride_gn
                            + (p[None, :] * B1 + gq[:, None]) * stride_gc,
                            mask=g_row_ok[:, None] & (p < A1)[None, :], other=0.0)
                a = tl.load(a_i + p[:, None] * stride_a1 + k[None, :] * stride_a2,
                            mask=(p < A1)[:, None] & (k < A2)[None, :], other=0.0)
                h = dot_acc(g, a, h, COMPUTE, BF16_EMULATED, False)
            ht = _rows_to_cols(_to_compute(h, COMPUTE, BF16_EMULATED), BLOCK_T, BLOCK_B1, BLOCK_A2)
            xt = _x_tile(x_tok, x_n_ok, k0 + rx % BLOCK_A2, c, A2, B2, stride_xn, stride_xc, BLOCK_A2)
            acc = dot_acc(ht, xt, acc, COMPUTE, BF16_EMULATED, False)

    out = out_ptr + split.to(tl.int64) * stride_os + i.to(tl.int64) * stride_or
    tl.store(out + q[:, None] * stride_o1 + c[None, :] * stride_o2, acc * scale,
             mask=(q < B1)[:, None] & (c < B2)[None, :])


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class Config:
    """Tile sizes and launch options of one kron_linear kernel (all powers of two, ≥ 16
    except ``BLOCK_T``). ``max_dim``: the largest factor dim the picker gives it."""

    name: str
    max_dim: int
    BLOCK_T: int  # tokens per program (forward) or per step of the token loop (gradients)
    BLOCK_A1: int
    BLOCK_A2: int
    BLOCK_B1: int
    BLOCK_B2: int
    num_warps: int
    num_stages: int = 2


# One config per factor size class, picked by the largest of a1, a2, b1, b2 (∂x, a
# transposed call, swaps them and gets the same config). Dims past a config's
# tiles are looped over (a2, b2 and the gradients' reductions) or spread over
# programs (a1, b1 and the gradients' outputs), so "f128" serves any size.
#
# What bounds the tiles is registers. On sm_80 each warp holds its whole share of a
# dot's operands in registers, K deep, and float32's 3xTF32 holds them twice (hi
# and lo): the reduction chunks (BLOCK_A2, BLOCK_B2 in the forward kernel) are 16,
# one tensor-core K step of 16-bit data. The token block stacks tokens into M, the
# tall side of the dots, so that small factors still give 64-128-row tiles (and
# Hopper's wgmma, which needs M ≥ 64; the forward's first dot in "f64" and "f128",
# 32 and 16 rows, runs on mma.sync there, its second dot on wgmma). In the
# gradients the token block is also the K of the second dot, so BLOCK_T × the
# chunk stays at 16-64. The forward kernel covers a1 with one tile where it can
# (BLOCK_A1 = 128 in "f128"): a1 tiles recompute Z, b1 tiles only re-read X from
# L2. Every build compiles without spills on sm_80 and sm_90
# (tests/triton/test_kron_linear_kernels.py prints registers and shared memory).
CONFIGS: dict[str, tuple[Config, ...]] = {
    "forward": (
        Config("f16", 16, BLOCK_T=8, BLOCK_A1=16, BLOCK_A2=16, BLOCK_B1=16, BLOCK_B2=16, num_warps=8),
        Config("f32", 32, BLOCK_T=4, BLOCK_A1=32, BLOCK_A2=16, BLOCK_B1=32, BLOCK_B2=16, num_warps=8),
        Config("f64", 64, BLOCK_T=2, BLOCK_A1=64, BLOCK_A2=16, BLOCK_B1=64, BLOCK_B2=16, num_warps=8),
        Config("f128", 128, BLOCK_T=1, BLOCK_A1=128, BLOCK_A2=16, BLOCK_B1=64, BLOCK_B2=16, num_warps=8),
    ),
    # Output tile BLOCK_A1 x BLOCK_A2; reductions over tokens, b1 (BLOCK_B1) and b2 (BLOCK_B2).
    "grad_a": (
        Config("f16", 16, BLOCK_T=4, BLOCK_A1=16, BLOCK_A2=16, BLOCK_B1=16, BLOCK_B2=16, num_warps=4),
        Config("f32", 32, BLOCK_T=2, BLOCK_A1=32, BLOCK_A2=32, BLOCK_B1=16, BLOCK_B2=16, num_warps=4),
        Config("f64", 64, BLOCK_T=2, BLOCK_A1=64, BLOCK_A2=32, BLOCK_B1=16, BLOCK_B2=16, num_warps=8),
        Config("f128", 128, BLOCK_T=1, BLOCK_A1=64, BLOCK_A2=64, BLOCK_B1=16, BLOCK_B2=16, num_warps=8),
    ),
    # Output tile BLOCK_B1 x BLOCK_B2; reductions over tokens, a2 (BLOCK_A2) and a1 (BLOCK_A1).
    "grad_b": (
        Config("f16", 16, BLOCK_T=4, BLOCK_A1=16, BLOCK_A2=16, BLOCK_B1=16, BLOCK_B2=16, num_warps=4),
        Config("f32", 32, BLOCK_T=2, BLOCK_A1=16, BLOCK_A2=16, BLOCK_B1=32, BLOCK_B2=32, num_warps=4),
        Config("f64", 64, BLOCK_T=2, BLOCK_A1=16, BLOCK_A2=16, BLOCK_B1=64, BLOCK_B2=32, num_warps=8),
        Config("f128", 128, BLOCK_T=1, BLOCK_A1=16, BLOCK_A2=16, BLOCK_B1=64, BLOCK_B2=64, num_warps=8),
    ),
}

# Register cap per compute dtype (``maxnreg``). Without one, ptxas picks a lower
# target for these nested loops and spills (grad_a "f16" bf16 on sm_80: 96
# registers and 24 B of spills; capped, 126 and none). 16-bit builds fit in 128
# (2 CTAs of 8 warps or 4 of 4 per SM); float32's 3xTF32 needs up to ~212.
_MAXNREG = {tl.bfloat16: 128, tl.float16: 128, tl.float32: 255}

_COMPUTE: dict[torch.dtype, tl.dtype] = {
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float32: tl.float32,
}


def pick_config(kernel: str, a1: int, a2: int, b1: int, b2: int) -> Config:
    """The first config of ``kernel`` ("forward", "grad_a" or "grad_b") whose ``max_dim``
    covers every factor dim (the last, which tiles any size, beyond)."""
    largest = max(a1, a2, b1, b2)
    configs = CONFIGS[kernel]
    for cfg in configs:
        if largest <= cfg.max_dim:
            return cfg
    return configs[-1]


# --------------------------------------------------------------------------- launchers



def _check_tensor(name: str, t: torch.Tensor, dim: int, layout: str) -> None:
    if t.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-D tensor {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in _COMPUTE:
        raise TypeError(f"{name}: expected one of {tuple(_COMPUTE)}, got {t.dtype}")
    check_device(name, t)


def _check_factors(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> tuple[int, int, int, int, int]:
    """``(r, a1, a2, b1, b2)`` after checking ``x [N, a2·b2]``, ``A [r, a1, a2]``, ``B [r, b1, b2]``."""
    _check_tensor("x", x, 2, "[N, a2*b2]")
    _check_tensor("A", A, 3, "[r, a1, a2]")
    _check_tensor("B", B, 3, "[r, b1, b2]")
    r, a1, a2 = A.shape
    _, b1, b2 = B.shape
    if B.shape[0] != r:
        raise ValueError(f"B: expected {r} factors (as A has), got shape {tuple(B.shape)}")
    if x.shape[1] != a2 * b2:
        raise ValueError(
            f"x: expected shape [N, {a2 * b2}] (a2*b2 for A {tuple(A.shape)} and B "
            f"{tuple(B.shape)}), got {tuple(x.shape)}"
        )
    for name, t in (("A", A), ("B", B)):
        if t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (that of x), got {t.device}")
    return r, a1, a2, b1, b2


def _options(dtype: torch.dtype, config: Config) -> dict[str, object]:
    compute = _COMPUTE[dtype]
    return dict(
        COMPUTE=compute,
        BF16_EMULATED=compute == tl.bfloat16 and interpreted(),
        BLOCK_T=config.BLOCK_T,
        BLOCK_A1=config.BLOCK_A1,
        BLOCK_A2=config.BLOCK_A2,
        BLOCK_B1=config.BLOCK_B1,
        BLOCK_B2=config.BLOCK_B2,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        maxnreg=_MAXNREG[compute],
    )


def kron_linear(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, *, config: Config | None = None
) -> torch.Tensor:
    """``y [N, a1·b1] = scale · x · (Σ_i A_i ⊗ B_i)ᵀ`` in ``x``'s dtype, one fused kernel.

    ``x [N, a2·b2]`` (any strides), ``A [r, a1, a2]``, ``B [r, b1, b2]`` (any strides, so
    ``A.mT``/``B.mT`` give ``∂x`` without a copy; any supported float dtype, rounded to
    ``x``'s in registers). ``y`` is a new contiguous tensor. ``config`` overrides
    :func:`pick_config` (tests use it to span several tiles).
    """
    r, a1, a2, b1, b2 = _check_factors(x, A, B)
    N = x.shape[0]
    y = torch.empty(N, a1 * b1, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    config = config or pick_config("forward", a1, a2, b1, b2)
    grid = (triton.cdiv(N, config.BLOCK_T) * triton.cdiv(a1, config.BLOCK_A1)
            * triton.cdiv(b1, config.BLOCK_B1))
    torch.library.wrap_triton(_kron_linear_kernel)[(grid,)](
        x, A, B, y, float(scale), N, r, a1, a2, b1, b2, *x.stride(), *A.stride(), *B.stride(),
        y.stride(0), **_options(x.dtype, config),
    )
    return y


_MIN_BLOCKS_PER_SPLIT = 16  # token blocks per split at least, to amortise the workspace


def _auto_splits(tiles: int, token_blocks: int, device: torch.device) -> int:
    """Token splits that give the gradient kernels about 2 CTAs per SM: ``r`` × the
    factor tiles is often a handful, the token count large. Depends only on the shapes
    and the device, so results are reproducible run to run."""
    if device.type != "cuda":
        return 1
    sms = sm_count(device)
    if tiles >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, tiles), token_blocks // _MIN_BLOCKS_PER_SPLIT))


def _grad(
    kernel: object, x: torch.Tensor, grad_y: torch.Tensor, factor: torch.Tensor, scale: float,
    dims: tuple[int, int, int, int, int], out: tuple[int, int], blocks: tuple[int, int],
    config: Config, splits: int | None,
) -> torch.Tensor:
    """Launch a gradient kernel whose programs own ``blocks`` tiles of a ``[r, *out]``
    gradient; return its float32 sum over the token splits."""
    r, a1, a2, b1, b2 = dims
    (rows, cols), (block_rows, block_cols) = out, blocks
    N = x.shape[0]
    if N == 0 or r * rows * cols == 0:
        return torch.zeros(r, rows, cols, dtype=torch.float32, device=x.device)
    tiles = r * triton.cdiv(rows, block_rows) * triton.cdiv(cols, block_cols)
    token_blocks = triton.cdiv(N, config.BLOCK_T)
    splits = splits or _auto_splits(tiles, token_blocks, x.device)
    per_split = triton.cdiv(token_blocks, splits)
    splits = triton.cdiv(token_blocks, per_split)  # no empty split
    # Every element is written: each (split, i, tile) is one program.
    work = torch.empty(splits, r, rows, cols, dtype=torch.float32, device=x.device)
    torch.library.wrap_triton(kernel)[(splits * tiles,)](
        x, grad_y, factor, work, float(scale), N, r, a1, a2, b1, b2, per_split,
        *x.stride(), *grad_y.stride(), *factor.stride(), *work.stride(),
        **_options(x.dtype, config),
    )
    return work[0] if splits == 1 else work.sum(0)


def kron_linear_factor_grads(
    x: torch.Tensor,
    grad_y: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    *,
    config_a: Config | None = None,
    config_b: Config | None = None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∂A [r, a1, a2], ∂B [r, b1, b2])`` of :func:`kron_linear`, in ``A``'s / ``B``'s dtype.

    ``∂A_i = scale · Σ_n G[n]·B_i·X[n]ᵀ``, ``∂B_i = scale · Σ_n G[n]ᵀ·A_i·X[n]`` with
    ``G = grad_y.view(N, a1, b1)``, ``X = x.view(N, a2, b2)``; ``grad_y [N, a1·b1]`` in
    ``x``'s dtype (the compute dtype), any strides. Accumulated in float32 over
    tokens, split over token blocks into a float32 workspace summed in torch
    (deterministic: no atomics). ``config_a``/``config_b``/``splits`` override the
    defaults (tests use them to cover several tiles and splits).
    """
    dims = _check_factors(x, A, B)
    r, a1, a2, b1, b2 = dims
    _check_tensor("grad_y", grad_y, 2, "[N, a1*b1]")
    if grad_y.shape != (x.shape[0], a1 * b1):
        raise ValueError(f"grad_y: expected shape [{x.shape[0]}, {a1 * b1}], got {tuple(grad_y.shape)}")
    if grad_y.dtype != x.dtype:
        raise ValueError(f"grad_y: expected dtype {x.dtype} (that of x), got {grad_y.dtype}")
    if grad_y.device != x.device:
        raise ValueError(f"grad_y: expected device {x.device} (that of x), got {grad_y.device}")
    if splits is not None and splits < 1:
        raise ValueError(f"splits: expected a positive int, got {splits}")
    ca = config_a or pick_config("grad_a", a1, a2, b1, b2)
    cb = config_b or pick_config("grad_b", a1, a2, b1, b2)
    grad_A = _grad(_kron_grad_a_kernel, x, grad_y, B, scale, dims, (a1, a2),
                   (ca.BLOCK_A1, ca.BLOCK_A2), ca, splits)
    grad_B = _grad(_kron_grad_b_kernel, x, grad_y, A, scale, dims, (b1, b2),
                   (cb.BLOCK_B1, cb.BLOCK_B2), cb, splits)
    return grad_A.to(A.dtype), grad_B.to(B.dtype)


# --------------------------------------------------------------------------- compile check




def _cases(name: str, kernel: object, types: dict[str, str], constexprs: dict[str, object],
           options: dict[str, int]) -> Iterator[CompileCase]:
    """The build of ``kernel`` for any operands and the one for 16-aligned operands.

    Arguments not in ``types`` or ``constexprs`` are i32. "aligned" assumes 16-byte
    aligned pointers and strides that are multiples of 16 (factor dims like 64);
    "any" assumes nothing (dims like 5 x 7).
    """
    names = kernel.arg_names  # type: ignore[attr-defined]
    signature = {a: "constexpr" if a in constexprs else types.get(a, "i32") for a in names}
    aligned = tuple(a for a in names if a not in constexprs
                    and (signature[a].startswith("*") or a.startswith("stride")))
    yield CompileCase(f"{name}-any", kernel, signature, constexprs, options, True)
    yield CompileCase(f"{name}-aligned", kernel, signature, constexprs, options, True, aligned)


def compile_cases() -> Iterator[CompileCase]:
    """Every kernel × config × compute dtype, as the compile check builds them.

    All tensors are stored in the compute dtype (workspaces float32); unit strides
    are constexpr 1, as the JIT specialises them for contiguous operands. The
    forward kernel is built for contiguous factors (``y = kron_linear(x, A, B)``) and
    for transposed ones (``∂x = kron_linear(G, A.mT, B.mT)``); each build comes
    without and with 16-divisibility (see :func:`_cases`).
    """
    kernels = {"forward": _kron_linear_kernel, "grad_a": _kron_grad_a_kernel,
               "grad_b": _kron_grad_b_kernel}
    for compute in (tl.bfloat16, tl.float16, tl.float32):
        ptr = PTR[compute]
        for kernel_name, configs in CONFIGS.items():
            kernel = kernels[kernel_name]
            for cfg in configs:
                const = dict(COMPUTE=compute, BF16_EMULATED=False, BLOCK_T=cfg.BLOCK_T,
                             BLOCK_A1=cfg.BLOCK_A1, BLOCK_A2=cfg.BLOCK_A2, BLOCK_B1=cfg.BLOCK_B1,
                             BLOCK_B2=cfg.BLOCK_B2, stride_xc=1)
                options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                               maxnreg=_MAXNREG[compute])
                name = f"{kernel_name}-{cfg.name}-{compute}"
                types = dict(x_ptr=ptr, a_ptr=ptr, b_ptr=ptr, g_ptr=ptr, y_ptr=ptr,
                             out_ptr="*fp32", scale="fp32")
                if kernel_name == "forward":
                    layouts = (("AB", ("stride_a2", "stride_b2")), ("AtBt", ("stride_a1", "stride_b1")))
                    for op, units in layouts:
                        yield from _cases(f"{name}-{op}", kernel, types,
                                          dict(const, **{u: 1 for u in units}), options)
                else:
                    unit = "stride_b2" if kernel_name == "grad_a" else "stride_a2"
                    yield from _cases(name, kernel, types,
                                      dict(const, stride_gc=1, stride_o2=1, **{unit: 1}), options)
