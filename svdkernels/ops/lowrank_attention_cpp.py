"""The C++ decode backend of ``lowrank_attention`` (``csrc/cpu/lowrank_attention.cpp``).

The kernel (the internal op ``torch.ops.svdkernels._cpp_lowrank_attention_decode``)
does the part that grows with the cache: scores over each sequence's valid prefix
(absorbed, or keys reconstructed from the latents and rotated in registers), the
online softmax and ``softmax · C_v``, split over the keys across threads. What is
per step and small stays here, as the reference computes it: the absorbed query
``sm_scale · q_h · W_k,jᵀ`` and the value basis ``(softmax·C_v) · W_v,j``.

Runs float32 and bfloat16 (latents in their own dtype, products in float32) for up
to :data:`CPP_MAX_SQ` query tokens per sequence (decode, speculative decoding);
other calls run the reference.
"""
from __future__ import annotations

from typing import Optional

import torch

from svdkernels.reference import lowrank_attention as reference

CPP_DTYPES = (torch.float32, torch.bfloat16)
"""Dtypes of ``q`` (and latents, bases) the C++ kernel takes."""

CPP_MAX_SQ = 16
"""Most query tokens per sequence the C++ kernel takes (its per-thread state is
``Hq·Sq`` rows; prefill runs the reference's GEMMs)."""


def cpp_supports(q: torch.Tensor) -> bool:
    """Whether the C++ kernel can run this call (CPU, float32/bfloat16, ``Sq <= CPP_MAX_SQ``)."""
    return q.device.type == "cpu" and q.dtype in CPP_DTYPES and q.shape[2] <= CPP_MAX_SQ


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
    isa: int = -1,
    absorb: Optional[bool] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's math on the C++ kernel (inputs validated, :func:`cpp_supports` true).

    Shapes and results as :func:`svdkernels.reference.lowrank_attention.lowrank_attention`.
    ``isa``: -1 the best this CPU runs, 0 portable C++, 1 AVX2, 2 AVX-512 (3 runs
    as 2); more than the CPU supports is a ``ValueError``. ``absorb``: scores in
    latent space (only without RoPE); ``None`` picks the cheaper order
    (:func:`~svdkernels.reference.lowrank_attention.absorb_is_cheaper`).
    """
    import svdkernels._C  # noqa: F401 - registers the internal op

    B, Hq, Sq, d = q.shape
    rk, rv = k_latent.shape[2], v_latent.shape[2]
    Hkv = k_basis.shape[-1] // d
    g = Hq // Hkv
    if absorb is None:
        absorb = not rope and reference.absorb_is_cheaper(Hq, Sq, Hkv, d, rk)
    if absorb and rope:
        raise ValueError("absorb: the key basis cannot be absorbed into q when keys carry RoPE")
    # Query rows grouped by kv head (h = j·g + i), row m = h·Sq + s as in q's layout.
    qg = q.float().reshape(B, Hkv, g * Sq, d)
    basis = inv_freq = None
    if absorb:
        Wk = k_basis.float().reshape(-1, rk, Hkv, d)
        qk = (torch.matmul(qg, Wk.permute(0, 2, 3, 1)) * sm_scale).reshape(B, Hq * Sq, rk)
    else:
        qk = (qg * sm_scale).reshape(B, Hq * Sq, d)
        basis = k_basis.float().reshape(-1, rk, Hkv * d).contiguous()
        if rope:
            inv_freq = reference.rope_inv_freq(rotary_dim, rope_theta, rope_scaling, q.device)
    o_lat, lse = torch.ops.svdkernels._cpp_lowrank_attention_decode(
        qk.contiguous(), k_latent.contiguous(), v_latent.contiguous(), basis, inv_freq, cache_seqlens, Sq,
        causal, rope_layout, isa)
    Wv = v_basis.float().reshape(-1, rv, Hkv, d).transpose(1, 2)
    out = torch.matmul(o_lat.view(B, Hkv, g * Sq, rv), Wv).view(B, Hq, Sq, d)
    return out.to(q.dtype), lse.view(B, Hq, Sq)
