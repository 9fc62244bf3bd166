"""Triton backend of ``lowrank_attention``: flash-decoding over a low-rank KV cache.

Shapes (as the op, :mod:`svdkernels.ops.lowrank_attention`): ``q [B, Hq, Sq, d]``,
``k_latent [B, T, rk]``, ``v_latent [B, T, rv]``, ``k_basis [rk, Hkv·d]`` or
``[B, rk, Hkv·d]``, ``v_basis [rv, Hkv·d]`` or ``[B, rv, Hkv·d]``, ``cache_seqlens [B]``.
Query heads ``h = j·g + i`` share kv head ``j`` (``g = Hq / Hkv``).

Kernel
------
:func:`_split_kernel` is one flash-decoding pass (FlashDecoding, Dao et al. 2023) over a
split of the cache. A program owns one sequence ``b``, one kv head ``j``, a block of
``BLOCK_M`` query rows and a contiguous range of key tiles (its split). The rows are
``(i, s)``: the ``g`` query heads of the group times the ``Sq`` queries (decode: ``Sq = 1``;
prefill folds ``Sq`` into the rows), so one reconstructed key tile serves the whole
group (GQA). Per tile of ``BLOCK_T`` keys:

1. Keys. Reconstruct mode (xKV, Chang et al. 2025; Palu, Chang et al. 2024): the
   pre-RoPE tile ``K = C_k[tile] · W_k[:, head j]`` (``tl.dot``, float32 accumulation,
   looping over ``rk`` in ``BLOCK_R`` chunks), then RoPE in registers. Absorbed mode
   (keys without RoPE, DeepSeek-V2's MLA): the launcher forms ``q̃ = q · W_k,jᵀ [rk]``
   once per head and the "keys" are the latents ``C_k[tile]`` themselves.
   Either way the feature dim (``d`` or ``rk``) is walked in ``BLOCK_D`` chunks.
2. Scores ``Sᵀ [BLOCK_T, BLOCK_M] = K · qᵀ``: keys in the dot's M (the tall side, 64+
   rows as Hopper's ``wgmma`` wants, even at decode where the group has 4-8 rows),
   masked to ``t < L_b`` and, with ``causal``, ``t <= L_b - Sq + s`` (bottom-right).
3. Online softmax in base 2 (``sm_scale·log2 e`` folded into the scores) and
   ``accᵀ [rv, BLOCK_M] += C_vᵀ[:, tile] · Pᵀ``: values stay latent (rv in M, a
   ``BLOCK_RV`` slice of it per program when ``rv`` is larger).

Each program writes its partial ``(accᵀ, m, l)`` to a float32 workspace (no atomics);
the launcher merges the splits in torch in a fixed order (deterministic) and applies
the value basis once: ``out_h = (acc / l) · W_v[:, head j]``, ``lse = ln 2·(m + log2 l)``.

RoPE layouts. Scores are dot products over the head's features, so permuting the
columns of ``q`` and ``K`` alike changes nothing. The kernel reads both in
"interleaved" order, rotating adjacent pairs ``(2i, 2i+1)`` (a reshape to
``[.., D/2, 2]`` and ``tl.split``); for "neox" the loads gather columns
``(i, i + r/2)`` into those adjacent slots, so both layouts (and partial rotary,
columns past ``r`` passing through) cost the same. Angles are
``t · inv_freq[i]`` in float32 with ``inv_freq`` computed on the host exactly as
the reference (Hugging Face) computes it; ``tl.cos``/``tl.sin`` lower to the
accurate libdevice routines (no ``.approx`` in the PTX, which would lose the large
angles of long caches).

Precision. Operands are rounded to the compute dtype (that of ``q``) for the dots:
bfloat16 / float16 on the tensor cores with float32 accumulation; float32 is 3xTF32
(:func:`svdkernels.triton.common.dot_acc`, ~1e-5 relative to a float32 reference).
The reconstructed keys and the probabilities are rounded to the compute dtype
before their dots (as flash attention rounds P), and so is the absorbed query
``q̃`` (formed in float32 in torch); everything else is float32.
float64 is not supported (the reference runs it, or forcing triton raises).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from svdkernels.reference import lowrank_attention as reference
from svdkernels.triton.common import CompileCase, PTR, dot_acc, interpreted, sm_count


_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


# --------------------------------------------------------------------------- kernels


@triton.jit
def _rope_pairs(k, t, d0, inv_freq_ptr, rot_half,
                BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """``k [BLOCK_T, BLOCK_D]`` (float32, features ``d0..d0+BLOCK_D`` in interleaved
    order) rotated at positions ``t [BLOCK_T]``: pair ``(2i, 2i+1)`` by ``t·inv_freq[i]``;
    pairs past ``rot_half`` get angle 0, an exact identity (partial rotary)."""
    i = d0 // 2 + tl.arange(0, BLOCK_D // 2)
    inv = tl.load(inv_freq_ptr + i, mask=i < rot_half, other=0.0)
    angle = t.to(tl.float32)[:, None] * inv[None, :]
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    x1, x2 = tl.split(tl.reshape(k, (BLOCK_T, BLOCK_D // 2, 2)))
    return tl.reshape(tl.join(x1 * cos - x2 * sin, x2 * cos + x1 * sin), (BLOCK_T, BLOCK_D))


@triton.jit
def _split_kernel(
    q_ptr, ck_ptr, cv_ptr, wk_ptr, inv_freq_ptr, seqlens_ptr,
    acc_ptr, m_ptr, l_ptr,
    scale_log2,
    T, DK, RK, RV, Sq, M_ROWS, G, HKV, rot_half, tiles_per_split, n_mblocks, n_vblocks,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_ckb, stride_ckt, stride_ckr,
    stride_cvb, stride_cvt, stride_cvr,
    stride_wkb, stride_wkr, stride_wkn,
    HAS_SEQLENS: tl.constexpr, CAUSAL: tl.constexpr, ABSORBED: tl.constexpr,
    ROPE: tl.constexpr, NEOX: tl.constexpr,
    COMPUTE: tl.constexpr, BF16_EMULATED: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_RV: tl.constexpr,
):
    """Partial attention of one (sequence, kv head, row block, rv block) over one split.

    ``q_ptr``: ``q [B, Hq, Sq, d]`` (reconstruct) or ``q̃ [B, Hq, Sq, rk]`` (absorbed);
    ``DK`` is that last dim. Writes float32 ``acc [B·HKV, S, M_ROWS, RV]``
    (unnormalised ``P·C_v``), ``m``, ``l [B·HKV, S, M_ROWS]`` (base-2 running max and
    sum), ``S`` = the number of splits (grid axis 1), every element exactly once.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    vb = pid % n_vblocks
    rest = pid // n_vblocks
    mb = rest % n_mblocks
    bh = rest // n_mblocks
    b = (bh // HKV).to(tl.int64)
    j = bh % HKV

    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M_ROWS
    s_idx = rows % Sq
    q_rows = q_ptr + b * stride_qb + (j * G + rows // Sq).to(tl.int64) * stride_qh + s_idx * stride_qs
    if HAS_SEQLENS:
        L = tl.load(seqlens_ptr + b).to(tl.int32)
    else:
        L = T
    t_lo = split * tiles_per_split * BLOCK_T
    t_hi = tl.minimum(t_lo + tiles_per_split * BLOCK_T, L)
    last_key = L - Sq + s_idx  # causal, bottom-right: row (i, s) sees t <= L - Sq + s
    if CAUSAL:
        # Tiles past every row's last key hold nothing to see (prefill's upper triangle).
        t_hi = tl.minimum(t_hi, tl.max(tl.where(row_ok, last_key, -1)) + 1)

    ck_b = ck_ptr + b * stride_ckb
    cv_b = cv_ptr + b * stride_cvb
    wk_j = wk_ptr + b * stride_wkb + (j * DK).to(tl.int64) * stride_wkn
    v_cols = vb * BLOCK_RV + tl.arange(0, BLOCK_RV)
    rr = tl.arange(0, BLOCK_R)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_RV, BLOCK_M), tl.float32)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < t_hi  # never read latents at t >= L_b: they may hold NaN
        ck_t = ck_b + t.to(tl.int64)[:, None] * stride_ckt
        s = tl.zeros((BLOCK_T, BLOCK_M), tl.float32)
        for d0 in range(0, DK, BLOCK_D):
            e = d0 + tl.arange(0, BLOCK_D)
            e_ok = e < DK
            if NEOX:
                # Interleaved slot e holds neox column i (e = 2i) or i + r/2 (e = 2i+1).
                col = tl.where(e < 2 * rot_half, (e // 2) + (e % 2) * rot_half, e)
            else:
                col = e
            if ABSORBED:
                k = tl.load(ck_t + e[None, :] * stride_ckr, mask=t_ok[:, None] & e_ok[None, :], other=0.0)
            else:
                k = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
                for r0 in range(0, RK, BLOCK_R):
                    r = r0 + rr
                    c = tl.load(ck_t + r[None, :] * stride_ckr, mask=t_ok[:, None] & (r < RK)[None, :], other=0.0)
                    w = tl.load(wk_j + r[:, None] * stride_wkr + col[None, :] * stride_wkn,
                                mask=(r < RK)[:, None] & e_ok[None, :], other=0.0)
                    k = dot_acc(c, w, k, COMPUTE, BF16_EMULATED, False)
                if ROPE:
                    k = _rope_pairs(k, t, d0, inv_freq_ptr, rot_half, BLOCK_T, BLOCK_D)
            qt = tl.load(q_rows[None, :] + col[:, None] * stride_qd, mask=e_ok[:, None] & row_ok[None, :],
                         other=0.0)
            s = dot_acc(k, qt, s, COMPUTE, BF16_EMULATED, False)

        visible = t_ok[:, None] & row_ok[None, :]
        if CAUSAL:
            visible = visible & (t[:, None] <= last_key[None, :])
        s = tl.where(visible, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: no NaN
        p = tl.exp2(s - m_base[None, :])
        alpha = tl.exp2(m_i - m_base)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        vt = tl.load(cv_b + t.to(tl.int64)[None, :] * stride_cvt + v_cols[:, None] * stride_cvr,
                     mask=(v_cols < RV)[:, None] & t_ok[None, :], other=0.0)
        acc = dot_acc(vt, p, acc * alpha[None, :], COMPUTE, BF16_EMULATED, False)
        m_i = m_new

    part = (bh.to(tl.int64) * n_splits + split) * M_ROWS + rows  # [BLOCK_M] row of the workspace
    tl.store(acc_ptr + part[None, :] * RV + v_cols[:, None], acc,
             mask=(v_cols < RV)[:, None] & row_ok[None, :])
    ml_mask = rows + vb * M_ROWS < M_ROWS  # row_ok, and rv block 0 only: m, l are the same in every block
    tl.store(m_ptr + part, m_i, mask=ml_mask)
    tl.store(l_ptr + part, l_i, mask=ml_mask)


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class Config:
    """Tiles and launch options of :func:`_split_kernel` (powers of two, ≥ 16).

    ``max_rows``: the largest ``g·Sq`` (query rows per kv head) the picker gives it.
    """

    name: str
    max_rows: int
    BLOCK_T: int  # keys per tile (M of every dot)
    BLOCK_M: int  # query rows per program (N of the score and value dots)
    BLOCK_D: int  # feature chunk: d (reconstruct) or rk (absorbed)
    BLOCK_R: int  # rk chunk of the key reconstruction (its K)
    BLOCK_RV: int  # value-latent columns per program
    num_warps: int
    num_stages: int = 2


# Decode rows are the g heads of a GQA group (4-8); prefill folds Sq in. The keys are
# the dots' M so that decode still gives 64-row tiles (Hopper's wgmma needs M ≥ 64;
# where BLOCK_T is 32 the value dot, M = BLOCK_RV, is the one on wgmma).
#
# Registers bound the tiles. On sm_80 a dot's B operand is held K deep by every warp
# along M, so P [BLOCK_T, BLOCK_M] (the value dot's B) grows as BLOCK_T·BLOCK_M, and
# float32's 3xTF32 holds every operand twice (hi and lo): float32 takes half the keys
# per tile. Software pipelining (num_stages 2) of the nested key/rank loops costs
# 40-60 registers and pushed every float32 build into spills; these are single-stage
# (the latent loads are few and wide). Every build compiles without spills on sm_80
# and sm_90 (tests/triton/test_lowrank_attention_kernels.py prints registers).
CONFIGS: dict[str, tuple[Config, ...]] = {
    "16bit": (
        Config("decode", 16, BLOCK_T=64, BLOCK_M=16, BLOCK_D=64, BLOCK_R=32, BLOCK_RV=128, num_warps=8, num_stages=1),
        Config("prefill", 1 << 62, BLOCK_T=64, BLOCK_M=64, BLOCK_D=32, BLOCK_R=32, BLOCK_RV=128, num_warps=8,
               num_stages=1),
    ),
    "fp32": (
        Config("decode", 16, BLOCK_T=32, BLOCK_M=16, BLOCK_D=64, BLOCK_R=32, BLOCK_RV=128, num_warps=4, num_stages=1),
        Config("prefill", 1 << 62, BLOCK_T=32, BLOCK_M=64, BLOCK_D=64, BLOCK_R=32, BLOCK_RV=128, num_warps=8,
               num_stages=1),
    ),
}

# No register cap: ptxas's own target spilled the 16-bit builds at 128.
_MAXNREG = {tl.bfloat16: 255, tl.float16: 255, tl.float32: 255}

_COMPUTE: dict[torch.dtype, tl.dtype] = {
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float32: tl.float32,
}


def _family(dtype: torch.dtype | tl.dtype) -> str:
    return "fp32" if dtype in (torch.float32, tl.float32) else "16bit"


def pick_config(rows: int, dtype: torch.dtype) -> Config:
    """The first config for ``dtype`` whose ``max_rows`` covers ``rows = g·Sq`` query
    rows per kv head (decode: the GQA group; the last config covers any)."""
    return next(cfg for cfg in CONFIGS[_family(dtype)] if rows <= cfg.max_rows)


def _pow2_tile(block: int, n: int) -> int:
    """``block`` shrunk to the next power of two ≥ ``n`` (at least 16, ``tl.dot``'s minimum)."""
    return min(block, max(16, triton.next_power_of_2(n)))


# --------------------------------------------------------------------------- launcher



def _auto_splits(programs: int, tiles: int, device: torch.device) -> int:
    """Splits over T giving about 2 programs per SM (flash-decoding: B·Hkv alone rarely
    fills the GPU at decode). Depends only on shapes and device: reproducible."""
    if device.type != "cuda":
        return min(tiles, 2)  # interpreter: still exercise the combine
    sms = sm_count(device)
    return max(1, min(tiles, triton.cdiv(2 * sms, programs)))


def _options(dtype: torch.dtype, cfg: Config) -> dict[str, object]:
    compute = _COMPUTE[dtype]
    return dict(COMPUTE=compute, BF16_EMULATED=compute == tl.bfloat16 and interpreted(),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=_MAXNREG[compute])


def _heads(basis: torch.Tensor, d: int) -> torch.Tensor:
    """``[(B,) r, Hkv·d]`` -> float32 ``[B or 1, Hkv, r, d]``."""
    W = basis.float()
    W = W if W.dim() == 3 else W.unsqueeze(0)
    return W.view(W.shape[0], W.shape[1], -1, d).transpose(1, 2)


def lowrank_attention(
    q: torch.Tensor,
    k_latent: torch.Tensor,
    v_latent: torch.Tensor,
    k_basis: torch.Tensor,
    v_basis: torch.Tensor,
    cache_seqlens: Optional[torch.Tensor],
    causal: bool,
    sm_scale: float,
    rope: bool,
    rope_theta: float,
    rope_scaling: float,
    rope_layout: int,
    rotary_dim: int,
    *,
    absorb: Optional[bool] = None,
    config: Optional[Config] = None,
    num_splits: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op on the Triton kernel (inputs validated by the op); the reference's signature.

    Returns ``out [B, Hq, Sq, d]`` in ``q``'s dtype and float32 ``lse [B, Hq, Sq]``.
    ``absorb``: scores over the latents (MLA); ``None`` absorbs whenever keys carry no
    RoPE (the same product, no key reconstruction). ``config`` / ``num_splits``
    override :func:`pick_config` / the automatic split count (tests use them to span
    several tiles and splits). The op sends float64 to the reference.
    """
    if q.dtype not in _COMPUTE:  # the op dispatches other dtypes elsewhere (ops/lowrank_attention.py)
        raise ValueError(f"q: the triton kernel computes in float32, bfloat16 or float16, got {q.dtype}")
    if absorb is None:
        absorb = not rope
    if absorb and rope:
        raise ValueError("absorb: the key basis cannot be absorbed into q when keys carry RoPE")
    B, Hq, Sq, d = q.shape
    T, rk, rv = k_latent.shape[1], k_latent.shape[2], v_latent.shape[2]
    Hkv = k_basis.shape[-1] // d
    g = Hq // Hkv
    rows = g * Sq
    dev = q.device
    if B * rows == 0:
        return q.new_zeros(B, Hq, Sq, d), torch.empty(B, Hq, Sq, dtype=torch.float32, device=dev)

    if absorb:
        # q̃_h = q_h · W_k,jᵀ [B, Hkv, g·Sq, rk], once per head (MLA's absorption).
        q_in = torch.matmul(q.float().reshape(B, Hkv, rows, d), _heads(k_basis, d).transpose(-1, -2))
        q_in = q_in.to(q.dtype).view(B, Hq, Sq, rk)
        dk = rk
    else:
        q_in, dk = q, d
    rope_in_kernel = bool(rope) and not absorb
    # θ^(-2i/r) / scaling [r/2]: the reference's own float32 expression (at position 1, exact).
    inv_freq = (reference.rope_angles(torch.ones((), device=dev), rotary_dim, rope_theta, rope_scaling)
                if rope_in_kernel else torch.zeros(1, dtype=torch.float32, device=dev))

    cfg = config or pick_config(rows, q.dtype)
    blocks = dict(BLOCK_T=cfg.BLOCK_T, BLOCK_M=_pow2_tile(cfg.BLOCK_M, rows), BLOCK_D=_pow2_tile(cfg.BLOCK_D, dk),
                  BLOCK_R=_pow2_tile(cfg.BLOCK_R, rk), BLOCK_RV=_pow2_tile(cfg.BLOCK_RV, rv))
    n_mblocks = triton.cdiv(rows, blocks["BLOCK_M"])
    n_vblocks = triton.cdiv(rv, blocks["BLOCK_RV"])
    programs = B * Hkv * n_mblocks * n_vblocks
    tiles = max(1, triton.cdiv(T, cfg.BLOCK_T))
    splits = num_splits or _auto_splits(programs, tiles, dev)
    per_split = triton.cdiv(tiles, min(splits, tiles))
    splits = triton.cdiv(tiles, per_split)  # no split starts past T

    acc = torch.empty(B * Hkv, splits, rows, rv, dtype=torch.float32, device=dev)
    m = torch.empty(B * Hkv, splits, rows, dtype=torch.float32, device=dev)
    l = torch.empty_like(m)
    seqlens = cache_seqlens if cache_seqlens is not None else m  # unread without HAS_SEQLENS
    wk = k_basis if not absorb else k_latent  # unread when absorbed
    wk_strides = (0, *k_basis.stride()) if k_basis.dim() == 2 else k_basis.stride()
    torch.library.wrap_triton(_split_kernel)[(programs, splits)](
        q_in, k_latent, v_latent, wk, inv_freq, seqlens, acc, m, l,
        float(sm_scale) * _LOG2E,
        T, dk, rk, rv, Sq, rows, g, Hkv, rotary_dim // 2 if rope_in_kernel else 0, per_split,
        n_mblocks, n_vblocks,
        *q_in.stride(), *k_latent.stride(), *v_latent.stride(), *wk_strides,
        HAS_SEQLENS=cache_seqlens is not None, CAUSAL=bool(causal) and Sq > 1, ABSORBED=absorb,
        ROPE=rope_in_kernel, NEOX=rope_in_kernel and rope_layout == reference.ROPE_NEOX,
        **blocks, **_options(q.dtype, cfg),
    )
    return _combine(acc, m, l, v_basis, (B, Hq, Sq, d), q.dtype)


def _combine(acc: torch.Tensor, m: torch.Tensor, l: torch.Tensor, v_basis: torch.Tensor,
             shape: tuple[int, int, int, int], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the splits' partials ``acc [B·Hkv, S, rows, rv]``, ``m, l [B·Hkv, S, rows]``
    (base 2) in a fixed order, then ``out = (acc / l) · W_v,j``; returns ``(out, lse)``."""
    B, Hq, Sq, d = shape
    m_max = m.amax(dim=1)
    base = m_max.masked_fill(torch.isinf(m_max), 0.0)  # -inf: no split saw a key
    w = torch.exp2(m - base.unsqueeze(1))
    l_sum = (w * l).sum(dim=1)
    o_lat = (w.unsqueeze(-1) * acc).sum(dim=1) / l_sum.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    Hkv = acc.shape[0] // B
    o_lat = o_lat.view(B, Hkv, -1, acc.shape[-1])
    out = torch.matmul(o_lat, _heads(v_basis, d)).view(B, Hq, Sq, d)
    lse = (m_max + torch.log2(l_sum)) * _LN2
    return out.to(dtype), lse.view(B, Hq, Sq)


# --------------------------------------------------------------------------- compile check


_MODES = {"rope": dict(ABSORBED=False, ROPE=True, NEOX=True), "absorbed": dict(ABSORBED=True, ROPE=False, NEOX=False)}


def compile_cases() -> Iterator[CompileCase]:
    """:func:`_split_kernel` × config × compute dtype × mode (reconstruct with neox RoPE;
    absorbed), as the launcher builds it for contiguous operands: unit feature strides
    constexpr 1, 16-byte aligned pointers and strides (``d``, ``rk``, ``rv`` multiples of
    16, e.g. ``d = 128``, ``rk = rv = 256``), ragged lengths, causal for prefill."""
    kernel = _split_kernel
    names = kernel.arg_names  # type: ignore[attr-defined]
    for compute in (tl.bfloat16, tl.float16, tl.float32):
        ptr = PTR[compute]
        types = dict(q_ptr=ptr, ck_ptr=ptr, cv_ptr=ptr, wk_ptr=ptr, inv_freq_ptr="*fp32", seqlens_ptr="*i32",
                     acc_ptr="*fp32", m_ptr="*fp32", l_ptr="*fp32", scale_log2="fp32")
        for cfg in CONFIGS[_family(compute)]:
            for mode, flags in _MODES.items():
                const = dict(flags, HAS_SEQLENS=True, CAUSAL=cfg.BLOCK_M > 16, COMPUTE=compute, BF16_EMULATED=False,
                             BLOCK_T=cfg.BLOCK_T, BLOCK_M=cfg.BLOCK_M, BLOCK_D=cfg.BLOCK_D, BLOCK_R=cfg.BLOCK_R,
                             BLOCK_RV=cfg.BLOCK_RV, stride_qd=1, stride_ckr=1, stride_cvr=1, stride_wkn=1)
                signature = {a: "constexpr" if a in const else types.get(a, "i32") for a in names}
                aligned = tuple(a for a in names if a not in const and a != "seqlens_ptr"
                                and (signature[a].startswith("*") or a.startswith("stride")))
                options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=_MAXNREG[compute])
                case_id = f"split-{cfg.name}-{compute}-{mode}"  # the dtype picks the config family
                yield CompileCase(case_id, kernel, signature, const, options, True, aligned)
