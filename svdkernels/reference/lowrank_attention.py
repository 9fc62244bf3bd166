"""Attention over a low-rank KV cache in plain PyTorch: the reference backend.

For sequence ``b``, query head ``h`` and its kv head ``j = h // g`` (``g = Hq / Hkv``,
grouped-query attention), with ``C_k = k_latent[b] [T, rk]``, ``W_k = k_basis [rk, Hkv·d]``
and ``W_k,j`` its columns ``j·d : (j+1)·d`` (likewise ``C_v``, ``W_v``):

    k_t     = RoPE(C_k[t] · W_k,j, position t)            (keys stored pre-RoPE; xKV, Palu)
    s[i, t] = sm_scale · q_h[i] · k_t                     masked: t < L_b, and with causal
                                                          t <= L_b - Sq + i (bottom-right)
    lse[i]  = log Σ_t exp(s[i, t])
    out_h   = (softmax(s) · C_v) · W_v,j                  values are never reconstructed

``L_b`` is ``cache_seqlens[b]`` (``T`` without it). Without RoPE the key basis is
absorbed into the query instead (DeepSeek-V2's multi-head latent attention):
``s = sm_scale · (q_h · W_k,jᵀ) · C_kᵀ``, attention directly over the latents.
Both orders are the same product; :func:`lowrank_attention` picks the cheaper one.

``q`` arrives with RoPE already applied at its own positions (as every model
computes it); only keys are rotated here, key ``t`` at position ``t``. Scores
depend on positions only through ``q_pos - k_pos``, so nothing else is needed.

Every product accumulates in float32 (float64 for float64 input); rows with no
visible key give ``out = 0`` and ``lse = -inf``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

ROPE_NEOX = 0
"""Rotate pairs ``(x_i, x_{i + r/2})`` (GPT-NeoX / Hugging Face Llama ``rotate_half``)."""
ROPE_INTERLEAVED = 1
"""Rotate pairs ``(x_{2i}, x_{2i+1})`` (GPT-J, Meta's original Llama)."""

_TILE_ELEMENTS = 2**19
"""Reconstructed keys per tile (2 MiB of float32): measured 2.8x faster than whole-T
reconstruction at T = 16k, Hkv·d = 1024 on one core."""


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------
# RoPE


def rope_angles(positions: torch.Tensor, rotary_dim: int, theta: float, scaling: float) -> torch.Tensor:
    """``positions [...]`` -> float32 angles ``[..., rotary_dim/2]``: ``pos · θ^(-2i/r) / scaling``.

    Always float32, computed the way Hugging Face computes them (inverse frequencies,
    divided by the linear factor, times the position): a patched model rotates its
    keys exactly as its own rotary embedding rotates its queries, and every backend
    (a GPU kernel computes these in float32 too) agrees. At position 32k a float32
    angle is off by up to ~2e-3 rad; models are used with that rounding.
    """
    return positions.float().unsqueeze(-1) * rope_inv_freq(rotary_dim, theta, scaling, positions.device)


def rope_inv_freq(rotary_dim: int, theta: float, scaling: float, device: torch.device) -> torch.Tensor:
    """float32 ``[rotary_dim/2]`` frequencies ``θ^(-2i/r) / scaling``: angle = position · these."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float() / rotary_dim
    inv_freq = 1.0 / (theta**exponent)
    return inv_freq / scaling


def apply_rope(
    x: torch.Tensor,
    positions: torch.Tensor,
    *,
    theta: float,
    scaling: float,
    layout: int,
    rotary_dim: int,
) -> torch.Tensor:
    """Rotate ``x [..., n, d]`` at ``positions`` (broadcastable to ``[..., n]``).

    The first ``rotary_dim`` features rotate in pairs (``layout``: :data:`ROPE_NEOX`
    or :data:`ROPE_INTERLEAVED`); the rest pass through. Float32 angles
    (:func:`rope_angles`); their cosines and the rotation in float32 (float64 for
    float64 ``x``); the result has ``x``'s dtype.
    """
    acc = accumulate_dtype(x.dtype)
    angles = rope_angles(positions, rotary_dim, theta, scaling).to(acc)
    cos, sin = angles.cos(), angles.sin()
    xf = x.to(acc)
    rot, rest = xf[..., :rotary_dim], xf[..., rotary_dim:]
    if layout == ROPE_NEOX:
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([rotated, rest], dim=-1).to(x.dtype)


# ---------------------------------------------------------------------------
# Masking and the softmax


def visible_keys(
    Sq: int, T: int, cache_seqlens: Optional[torch.Tensor], causal: bool, device: torch.device
) -> Optional[torch.Tensor]:
    """Bool ``[B or 1, Sq or 1, T]`` (broadcastable to ``[B, Sq, T]``): key ``t`` visible
    to query ``i``; ``None`` when every key is.

    Valid keys are ``t < L_b``; ``causal`` adds ``t <= L_b - Sq + i`` (queries are the
    last ``Sq`` positions of the cache, FlashAttention's bottom-right alignment).
    """
    causal = causal and Sq > 1  # one query (decode) sees t <= L - 1: every valid key
    if cache_seqlens is None and not causal:
        return None
    t = torch.arange(T, device=device)
    L: Union[int, torch.Tensor] = T
    mask = None
    if cache_seqlens is not None:
        L = cache_seqlens.to(torch.int64).view(-1, 1, 1)
        mask = t < L
    if causal:
        below = t <= L - Sq + torch.arange(Sq, device=device).view(1, Sq, 1)
        mask = below if mask is None else mask & below
    return mask


def softmax_lse(scores: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(softmax(scores), logsumexp(scores))`` over the last dim, masked keys excluded.

    A row with no visible key has probabilities 0 and ``lse = -inf`` (not NaN).
    ``masked_fill`` (not addition) so that garbage past ``cache_seqlens`` -- even
    NaN -- never reaches the result.
    """
    if mask is None and scores.shape[-1] > 0:
        # Every row sees a key: lse is finite, and torch's softmax is one fused pass.
        return torch.softmax(scores, dim=-1), torch.logsumexp(scores, dim=-1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    finite = lse.masked_fill(torch.isinf(lse), 0.0)
    return torch.exp(scores - finite.unsqueeze(-1)), lse


# ---------------------------------------------------------------------------
# The op


def absorb_is_cheaper(Hq: int, Sq: int, Hkv: int, d: int, rk: int) -> bool:
    """Per cached token, absorbed scores cost ``Hq·Sq·rk`` multiply-adds; reconstructing
    the keys costs ``rk·Hkv·d`` plus ``Hq·Sq·d`` for the scores. Decode absorbs;
    long prefill chunks reconstruct."""
    return Hq * Sq * rk <= rk * Hkv * d + Hq * Sq * d


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's math (inputs already validated); see the module docstring.

    Shapes: ``q [B, Hq, Sq, d]``, ``k_latent [B, T, rk]``, ``v_latent [B, T, rv]``,
    ``k_basis [rk, Hkv·d]`` or ``[B, rk, Hkv·d]``, ``v_basis [rv, Hkv·d]`` or
    ``[B, rv, Hkv·d]``, ``cache_seqlens [B]`` or ``None``.

    ``absorb``: compute scores in latent space (only without RoPE); ``None`` picks
    the cheaper order (:func:`absorb_is_cheaper`). Returns ``out [B, Hq, Sq, d]`` in
    ``q``'s dtype and ``lse [B, Hq, Sq]`` in the accumulation dtype.
    """
    B, Hq, Sq, d = q.shape
    T, rk, rv = k_latent.shape[1], k_latent.shape[2], v_latent.shape[2]
    Hkv = k_basis.shape[-1] // d
    g = Hq // Hkv
    if absorb is None:
        absorb = not rope and absorb_is_cheaper(Hq, Sq, Hkv, d, rk)
    if absorb and rope:
        raise ValueError("absorb: the key basis cannot be absorbed into q when keys carry RoPE")
    acc = accumulate_dtype(q.dtype)
    # Query heads grouped by their kv head: h = j·g + i.
    qg = q.to(acc).reshape(B, Hkv, g * Sq, d)
    Ck = k_latent.to(acc)

    if absorb:
        Wk = k_basis.to(acc).reshape(-1, rk, Hkv, d)
        # q̃_h = sm_scale · q_h · W_k,jᵀ  [B, Hkv, g·Sq, rk]; then one GEMM with the latents,
        # whose rows every head shares: [B, Hq·Sq, rk] x [B, rk, T].
        q_lat = torch.matmul(qg, Wk.permute(0, 2, 3, 1)) * sm_scale
        scores = torch.bmm(q_lat.reshape(B, Hq * Sq, rk), Ck.transpose(1, 2))
    else:
        # Keys reconstructed tile by tile (pre-RoPE), key t rotated at position t: a
        # tile of K stays cache-resident between its GEMM, its rotation and its scores.
        scores = torch.empty(B, Hkv, g * Sq, T, dtype=acc, device=q.device)
        Wk2 = k_basis.to(acc)
        tile = max(16, _TILE_ELEMENTS // (Hkv * d))
        for t0 in range(0, T, tile):
            t1 = min(t0 + tile, T)
            K = torch.matmul(Ck[:, t0:t1], Wk2).view(B, t1 - t0, Hkv, d).transpose(1, 2)
            if rope:
                K = apply_rope(K, torch.arange(t0, t1, device=q.device), theta=rope_theta, scaling=rope_scaling,
                               layout=rope_layout, rotary_dim=rotary_dim)
            scores[..., t0:t1] = torch.matmul(qg, K.transpose(-1, -2))
        scores = scores.mul_(sm_scale).view(B, Hq * Sq, T)

    mask = visible_keys(Sq, T, cache_seqlens, causal, q.device)
    scores = scores.view(B, Hkv, g, Sq, T)
    p, lse = softmax_lse(scores, None if mask is None else mask[:, None, None])

    Cv = v_latent.to(acc)
    if cache_seqlens is not None:
        # Rows past L_b carry probability 0, but 0·NaN is NaN: zero them.
        Cv = Cv.masked_fill((torch.arange(T, device=q.device) >= cache_seqlens.view(-1, 1)).unsqueeze(-1), 0.0)
    # (softmax · C_v) [B, Hkv, g·Sq, rv], then each head's slice of W_v: [rv, d].
    o_lat = torch.bmm(p.reshape(B, Hq * Sq, T), Cv).view(B, Hkv, g * Sq, rv)
    Wv = v_basis.to(acc).reshape(-1, rv, Hkv, d).transpose(1, 2)
    out = torch.matmul(o_lat, Wv).view(B, Hq, Sq, d)
    return out.to(q.dtype), lse.reshape(B, Hq, Sq)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    sm_scale: float,
    rope: Optional[tuple[float, float, int, int]] = None,
    k_start: Union[int, torch.Tensor] = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over dense keys and values, with its log-sum-exp.

    ``q [B, Hq, Sq, d]`` (RoPE applied), ``k [B, Hkv, S, d]``, ``v [B, Hkv, S, dv]``.
    With ``rope = (theta, scaling, layout, rotary_dim)`` the keys are pre-RoPE and
    key ``s`` is rotated at position ``k_start + s`` (``k_start`` an int or a ``[B]``
    tensor). ``causal``: the queries are the last ``Sq`` keys (bottom-right).
    Returns ``out [B, Hq, Sq, dv]`` in ``q``'s dtype and ``lse [B, Hq, Sq]``
    (float32; float64 for float64 input).
    """
    B, Hq, Sq, d = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    g = Hq // Hkv
    acc = accumulate_dtype(q.dtype)
    kf = k.to(acc)
    if rope is not None:
        theta, scaling, layout, rotary_dim = rope
        pos = torch.arange(S, device=q.device)
        if isinstance(k_start, torch.Tensor):
            pos = (k_start.to(torch.int64).view(-1, 1, 1) + pos).view(-1, 1, S)
        else:
            pos = pos + k_start
        kf = apply_rope(kf, pos, theta=theta, scaling=scaling, layout=layout, rotary_dim=rotary_dim)
    qg = q.to(acc).reshape(B, Hkv, g * Sq, d)
    scores = torch.matmul(qg, kf.transpose(-1, -2)).mul_(sm_scale).view(B, Hkv, g, Sq, S)
    mask = visible_keys(Sq, S, None, causal, q.device)
    p, lse = softmax_lse(scores, None if mask is None else mask[:, None, None])
    out = torch.matmul(p.view(B, Hkv, g * Sq, S), v.to(acc)).view(B, Hq, Sq, v.shape[-1])
    return out.to(q.dtype), lse.reshape(B, Hq, Sq)


def merge_attention(
    out1: torch.Tensor, lse1: torch.Tensor, out2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint key sets from the two partial results.

    ``out = (e^{lse1}·out1 + e^{lse2}·out2) / (e^{lse1} + e^{lse2})``, computed relative
    to the larger lse; ``lse = log(e^{lse1} + e^{lse2})``. Both ``-inf`` gives 0, ``-inf``.
    """
    acc = accumulate_dtype(out1.dtype)
    l1, l2 = lse1.to(acc), lse2.to(acc)
    m = torch.maximum(l1, l2)
    m = m.masked_fill(torch.isinf(m), 0.0)
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    den = w1 + w2
    out = (w1.unsqueeze(-1) * out1.to(acc) + w2.unsqueeze(-1) * out2.to(acc)) / den.clamp_min(
        torch.finfo(acc).tiny).unsqueeze(-1)
    return out.to(out1.dtype), m + torch.log(den)
