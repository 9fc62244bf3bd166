"""Triton backend of ``lowrank_adam_step``: a GaLore Adam step in two passes over the weight.

Shapes in the kernels' "right" form: ``G, W [M, K]``, basis rows ``P [R, K]``, moments
``m, v [M, R]``. The left side (``R = P·G``) is the right side of the transposes, which
the launcher passes as stride-swapped views (no copy).

Kernels
-------
- :func:`_project_adam_kernel`: a program owns ``BLOCK_M`` rows and ``BLOCK_R`` rank
  columns: ``acc = G[rows, :]·P[cols, :]ᵀ`` (a ``tl.dot`` loop over ``K`` in ``BLOCK_K``
  chunks, ``G`` in its natural layout, ``Pᵀ`` by strides), then Adam on the tile in
  registers: ``m ← β1·m + (1−β1)·acc``, ``v ← β2·v + (1−β2)·acc²`` stored in place, and
  ``N = m/(√v + eps)`` stored to a float32 ``[M, R]`` workspace (rank-size).
- :func:`_update_kernel`: a program owns a ``BLOCK_M × BLOCK_K`` tile of ``W``:
  ``acc = N[rows, :]·P[:, cols]`` (a ``tl.dot`` loop over ``R``), then
  ``W ← W − step_size·acc``, ``W ← W − decay·W`` and one store, rounded to nearest or
  stochastically (bfloat16, keyed by ``(seed, flat index)``, the reference's hash).

So the full-size traffic is one read of ``G`` and one read and one write of ``W``; no
full-size temporary exists. No atomics, no split reductions: deterministic.

The int4 basis (``PACKED``): bytes ``[R, ceil(K/2)]`` and float32 ``scale``, ``zero``
``[R, ceil(K/256)]`` (:func:`svdkernels.reference.lowrank_adam_step.quantize_basis`) are
read as tiles and dequantised in registers: ``q = (byte >> 4·(k & 1)) & 0xF``,
``P = q·scale + zero``.

Precision. The compute dtype is ``W``'s. bfloat16/float16: ``G`` as stored, ``P`` and
``N`` rounded to it in registers, ``tl.dot`` with float32 accumulation (what two 16-bit
GEMMs in torch would do with a 16-bit basis). float32: 3xTF32 (``dot_acc`` of
:mod:`svdkernels.triton.common`, ~21 bits per product). Moments, ``N`` and the update arithmetic are
float32; ``W`` is rounded once.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from svdkernels.reference.lowrank_adam_step import BASIS_GROUP, sr_key
from svdkernels.triton.common import PTR, CompileCase, check_device, dot_acc, interpreted, round_mantissa

# --------------------------------------------------------------------------- helpers


@triton.jit
def _basis_tile(p_ptr, s_ptr, z_ptr, r_idx, k_idx, mask, stride_pr, stride_pk, stride_sr, stride_sg,
                PACKED: tl.constexpr, GROUP: tl.constexpr):
    """``P[r_idx, k_idx]`` as float32 (any broadcast shape of the two index tensors)."""
    if PACKED:
        byte = tl.load(p_ptr + r_idx * stride_pr + (k_idx // 2) * stride_pk, mask=mask, other=0)
        q = (byte.to(tl.int32) >> ((k_idx & 1) * 4)) & 0xF
        g = k_idx // GROUP
        s = tl.load(s_ptr + r_idx * stride_sr + g * stride_sg, mask=mask, other=0.0)
        z = tl.load(z_ptr + r_idx * stride_sr + g * stride_sg, mask=mask, other=0.0)
        return tl.where(mask, q.to(tl.float32) * s + z, 0.0)
    return tl.load(p_ptr + r_idx * stride_pr + k_idx * stride_pk, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _hash32(x):
    """lowbias32 on uint32 (wrapping products), the reference's ``_hash32``."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _project_adam_kernel(
    g_ptr, p_ptr, s_ptr, z_ptr, m_ptr, v_ptr, n_ptr,
    M, K, R,
    stride_gm, stride_gk, stride_pr, stride_pk, stride_sr, stride_sg,
    stride_mm, stride_mr, stride_vm, stride_vr, stride_nm,
    beta1, beta2, eps,
    COMPUTE: tl.constexpr, BF16_EMULATED: tl.constexpr, PACKED: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``R = G·Pᵀ`` on a ``[BLOCK_M, BLOCK_R]`` tile, Adam's moments in place, ``N`` out."""
    pid = tl.program_id(0)
    n_r = tl.cdiv(R, BLOCK_R)
    tm, tr = pid // n_r, pid % n_r
    rows = tm * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tr * BLOCK_R + tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < R
    g_ptrs = g_ptr + rows[:, None].to(tl.int64) * stride_gm + rk[None, :] * stride_gk
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + rk < K
        g = tl.load(g_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        pt = _basis_tile(p_ptr, s_ptr, z_ptr, cols[None, :], (k0 + rk)[:, None], k_ok[:, None] & col_ok[None, :],
                         stride_pr, stride_pk, stride_sr, stride_sg, PACKED, GROUP)  # Pᵀ [BLOCK_K, BLOCK_R]
        acc = dot_acc(g, pt, acc, COMPUTE, BF16_EMULATED, False)
        g_ptrs += BLOCK_K * stride_gk
    ok = row_ok[:, None] & col_ok[None, :]
    m_ptrs = m_ptr + rows[:, None].to(tl.int64) * stride_mm + cols[None, :] * stride_mr
    v_ptrs = v_ptr + rows[:, None].to(tl.int64) * stride_vm + cols[None, :] * stride_vr
    m = tl.load(m_ptrs, mask=ok, other=0.0)
    v = tl.load(v_ptrs, mask=ok, other=0.0)
    m = beta1 * m + (1.0 - beta1) * acc
    v = beta2 * v + (1.0 - beta2) * (acc * acc)
    tl.store(m_ptrs, m, mask=ok)
    tl.store(v_ptrs, v, mask=ok)
    nrm = m / (tl.sqrt(v) + eps)
    tl.store(n_ptr + rows[:, None].to(tl.int64) * stride_nm + cols[None, :], nrm, mask=ok)


@triton.jit(do_not_specialize=["sr_key"])
def _update_kernel(
    w_ptr, n_ptr, p_ptr, s_ptr, z_ptr,
    M, K, R,
    stride_wm, stride_wk, stride_nm, stride_pr, stride_pk, stride_sr, stride_sg,
    step_size, decay, sr_key, sr_row, sr_col,
    COMPUTE: tl.constexpr, BF16_EMULATED: tl.constexpr, PACKED: tl.constexpr, GROUP: tl.constexpr,
    STOCHASTIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``W ← (W − step_size·N·P)`` then ``W ← W − decay·W`` on a ``[BLOCK_M, BLOCK_K]`` tile."""
    pid = tl.program_id(0)
    n_k = tl.cdiv(K, BLOCK_K)
    tm, tk = pid // n_k, pid % n_k
    rows = tm * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tk * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    row_ok = rows < M
    col_ok = cols < K
    n_ptrs = n_ptr + rows[:, None].to(tl.int64) * stride_nm + rr[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r_ok = r0 + rr < R
        nt = tl.load(n_ptrs, mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        pt = _basis_tile(p_ptr, s_ptr, z_ptr, (r0 + rr)[:, None], cols[None, :], r_ok[:, None] & col_ok[None, :],
                         stride_pr, stride_pk, stride_sr, stride_sg, PACKED, GROUP)  # P [BLOCK_R, BLOCK_K]
        acc = dot_acc(nt, pt, acc, COMPUTE, BF16_EMULATED, False)
        n_ptrs += BLOCK_R
    ok = row_ok[:, None] & col_ok[None, :]
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_wm + cols[None, :].to(tl.int64) * stride_wk
    w = tl.load(w_ptrs, mask=ok, other=0.0).to(tl.float32)
    w = w - step_size * acc
    w = w - decay * w
    if STOCHASTIC:
        # The reference's rounding: 16 hashed bits of (key, flat index) added below the
        # bfloat16 mantissa, then truncated; non-finite values keep their bits.
        idx = (rows[:, None].to(tl.int64) * sr_row + cols[None, :].to(tl.int64) * sr_col).to(tl.uint32)
        rnd = _hash32(idx ^ sr_key.to(tl.uint32)) & 0xFFFF
        bits = w.to(tl.uint32, bitcast=True)
        finite = tl.abs(w) < float("inf")
        bits = tl.where(finite, bits + rnd, bits) & 0xFFFF0000
        w = bits.to(tl.float32, bitcast=True)
    elif COMPUTE == tl.bfloat16:
        w = round_mantissa(w, 16)  # the GPU's rounding; the interpreter's cast would truncate
    tl.store(w_ptrs, w.to(w_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class Config:
    """Tiles of both kernels for one rank class (``max_rank``: the largest rank it serves
    in one ``BLOCK_R`` tile of the projection; larger ranks loop in the update kernel
    and spread over programs in the projection)."""

    name: str
    max_rank: int
    BLOCK_M: int
    BLOCK_R: int
    BLOCK_K: int
    UPDATE_M: int
    UPDATE_K: int
    UPDATE_R: int
    num_warps: int = 4
    num_stages: int = 2


CONFIGS = (
    Config("r32", 32, BLOCK_M=64, BLOCK_R=32, BLOCK_K=64, UPDATE_M=64, UPDATE_K=64, UPDATE_R=32, num_warps=8),
    # Larger ranks: 64-wide rank tiles spread over programs in the projection.
    Config("r64", 1 << 30, BLOCK_M=64, BLOCK_R=64, BLOCK_K=32, UPDATE_M=64, UPDATE_K=64, UPDATE_R=32,
           num_warps=8),
)
# 8 warps: the projection's epilogue holds four [BLOCK_M, BLOCK_R] float32 tiles (R, m, v,
# N) and their 64-bit pointers, and 3xTF32 three copies of each operand; with 4 warps the
# float32 builds reach 255 registers and spill on sm_80.


def pick_config(rank: int) -> Config:
    """The smallest rank class that holds ``rank``."""
    return next(c for c in CONFIGS if rank <= c.max_rank)


_COMPUTE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def lowrank_adam_step(
    W: torch.Tensor, G: torch.Tensor, P: torch.Tensor, P_scale: Optional[torch.Tensor],
    P_zero: Optional[torch.Tensor], exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, right: bool,
    beta1: float, beta2: float, eps: float, step_size: float, decay: float, sr_seed: Optional[int],
    *, config: Optional[Config] = None,
) -> None:
    """The step in place (arguments as the op's, validated by ``svdkernels.ops``).

    ``config`` overrides :func:`pick_config` (tests use it to cover several tiles).
    """
    check_device("W", W)
    m, n = W.shape
    r = P.shape[0]
    # The kernels' right form: G, W [M, K], moments [M, R].
    if right:
        Gk, Wk, mk, vk, sr_row, sr_col = G, W, exp_avg, exp_avg_sq, n, 1
    else:
        Gk, Wk, mk, vk, sr_row, sr_col = G.mT, W.mT, exp_avg.mT, exp_avg_sq.mT, 1, n
    M, K = Wk.shape
    cfg = config or pick_config(r)
    packed = P.dtype == torch.uint8
    if packed:
        s, z = P_scale, P_zero
        stride_sr, stride_sg = s.stride()
    else:
        s = z = P  # unused (PACKED is constexpr False)
        stride_sr = stride_sg = 0
    compute = _COMPUTE[W.dtype]
    emulated = compute == tl.bfloat16 and interpreted()
    N = torch.empty(M, r, dtype=torch.float32, device=W.device)
    if M == 0 or K == 0:
        return
    grid = (triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(r, cfg.BLOCK_R),)
    torch.library.wrap_triton(_project_adam_kernel)[grid](
        Gk, P, s, z, mk, vk, N, M, K, r,
        Gk.stride(0), Gk.stride(1), P.stride(0), P.stride(1), stride_sr, stride_sg,
        mk.stride(0), mk.stride(1), vk.stride(0), vk.stride(1), N.stride(0),
        beta1, beta2, eps,
        COMPUTE=compute, BF16_EMULATED=emulated, PACKED=packed, GROUP=BASIS_GROUP,
        BLOCK_M=cfg.BLOCK_M, BLOCK_R=cfg.BLOCK_R, BLOCK_K=cfg.BLOCK_K,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    stochastic = sr_seed is not None and W.dtype == torch.bfloat16
    key = sr_key(sr_seed) if stochastic else 0  # 31 bits: always an i32 argument
    grid = (triton.cdiv(M, cfg.UPDATE_M) * triton.cdiv(K, cfg.UPDATE_K),)
    torch.library.wrap_triton(_update_kernel)[grid](
        Wk, N, P, s, z, M, K, r,
        Wk.stride(0), Wk.stride(1), N.stride(0), P.stride(0), P.stride(1), stride_sr, stride_sg,
        step_size, decay, key, sr_row, sr_col,
        COMPUTE=compute, BF16_EMULATED=emulated, PACKED=packed, GROUP=BASIS_GROUP, STOCHASTIC=stochastic,
        BLOCK_M=cfg.UPDATE_M, BLOCK_K=cfg.UPDATE_K, BLOCK_R=cfg.UPDATE_R,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


# --------------------------------------------------------------------------- compile check


def compile_cases() -> Iterator[CompileCase]:
    """Both kernels × config × compute dtype × float/int4 basis (× stochastic rounding
    for bfloat16), as the launcher builds them for contiguous operands (unit strides
    along ``K`` constexpr 1: the right side's layout)."""
    def case(name: str, kernel: object, types: dict[str, str], constexprs: dict[str, object],
             cfg: Config) -> CompileCase:
        names = kernel.arg_names  # type: ignore[attr-defined]
        signature = {a: "constexpr" if a in constexprs else types.get(a, "i32") for a in names}
        return CompileCase(name, kernel, signature, constexprs,
                           dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages), True)

    for compute in (tl.bfloat16, tl.float16, tl.float32):
        ptr = PTR[compute]
        for cfg in CONFIGS:
            for packed in (False, True):
                basis = dict(p_ptr="*u8" if packed else "*fp32", s_ptr="*fp32", z_ptr="*fp32")
                tag = "int4" if packed else "f32basis"
                const = dict(COMPUTE=compute, BF16_EMULATED=False, PACKED=packed, GROUP=BASIS_GROUP)
                yield case(f"project-{cfg.name}-{compute}-{tag}", _project_adam_kernel,
                           dict(g_ptr=ptr, m_ptr="*fp32", v_ptr="*fp32", n_ptr="*fp32", beta1="fp32",
                                beta2="fp32", eps="fp32", **basis),
                           dict(const, BLOCK_M=cfg.BLOCK_M, BLOCK_R=cfg.BLOCK_R, BLOCK_K=cfg.BLOCK_K,
                                stride_gk=1, stride_pk=1), cfg)
                for stochastic in ((False, True) if compute == tl.bfloat16 else (False,)):
                    yield case(f"update-{cfg.name}-{compute}-{tag}{'-sr' if stochastic else ''}", _update_kernel,
                               dict(w_ptr=ptr, n_ptr="*fp32", step_size="fp32", decay="fp32", **basis),
                               dict(const, STOCHASTIC=stochastic, BLOCK_M=cfg.UPDATE_M, BLOCK_K=cfg.UPDATE_K,
                                    BLOCK_R=cfg.UPDATE_R, stride_wk=1, stride_pk=1), cfg)
