"""xKV: cross-layer SVD of the KV cache (Chang et al. 2025, "xKV: Cross-Layer SVD for
KV-Cache Compression").

Adjacent layers are grouped ``G`` at a time. For each group and each sequence, the
pre-RoPE keys of its layers are concatenated along features, ``A = [K_1 | … | K_G]``
``[T, G·Hkv·d]``, and truncated by a randomized SVD ``A ≈ U·Σ·Vh``: one per-token
latent ``C = A·Vhᵀ [T, r]`` shared by the group's layers, and per-layer bases, the
column blocks of ``Vh`` (``W_l [r, Hkv·d]``, so ``K_l ≈ C·W_l``). Values likewise,
with their own rank. ``G = 1`` is per-layer SVD (Palu's per-layer low-rank cache, on
the activations rather than the weights). Bases are per sequence: subspaces of
different prompts are not shared (ShadowKV).

The latent is the projection ``A·Vhᵀ`` (not ``U·Σ``): for the basis the SVD chose it
is the least-squares fit, and it is the same formula that later projects new
tokens onto the basis (:class:`svdkernels.kv.LowRankKVCache`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from svdkernels.errors import strict_kwargs
from svdkernels.ops.rsvd import rsvd

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class Factor:
    """One truncated SVD of a group's concatenated activations ``A [B, T, n]``.

    ``latent [B, T, r]`` and ``basis [B, r, n]`` (orthonormal rows) with
    ``A ≈ latent·basis``; ``singular_values [B, r]`` (float32) descending.
    """

    latent: torch.Tensor
    basis: torch.Tensor
    singular_values: torch.Tensor


@dataclass
class XKVGroup:
    """The compressed keys and values of a group of adjacent layers.

    ``k_latent [B, T, rk]`` and ``v_latent [B, T, rv]`` are shared by the group's
    layers; ``k_bases[i]`` / ``v_bases[i]`` (``[B, rk, n_l]`` / ``[B, rv, n_l]``,
    ``n_l = Hkv·d`` of layer ``layers[i]``) are per layer and per sequence, in the
    layout :func:`svdkernels.lowrank_attention` takes. ``k_singular_values [B, rk]``
    and ``v_singular_values [B, rv]`` are the group's spectra (float32).
    """

    layers: tuple[int, ...]
    k_latent: torch.Tensor
    v_latent: torch.Tensor
    k_bases: list[torch.Tensor]
    v_bases: list[torch.Tensor]
    k_singular_values: torch.Tensor
    v_singular_values: torch.Tensor

    def keys(self, i: int) -> torch.Tensor:
        """Reconstructed pre-RoPE keys ``[B, T, n_l]`` of the group's ``i``-th layer."""
        return self.k_latent @ self.k_bases[i]

    def values(self, i: int) -> torch.Tensor:
        """Reconstructed values ``[B, T, n_l]`` of the group's ``i``-th layer."""
        return self.v_latent @ self.v_bases[i]

    @property
    def nbytes(self) -> int:
        """Bytes of the latents and bases."""
        tensors = [self.k_latent, self.v_latent, *self.k_bases, *self.v_bases]
        return sum(t.numel() * t.element_size() for t in tensors)


def energy_rank(S: torch.Tensor, total: torch.Tensor, energy: float) -> int:
    """Smallest ``r`` with ``Σ_{i<r} σ_i² >= energy · ‖A‖_F²`` for every sequence.

    ``S [B, p]`` are the leading singular values, ``total [B]`` the squared Frobenius
    norms of the whole matrices (so energy beyond the computed ``p`` counts as
    missing, not ignored); ``p`` when even ``p`` components fall short.
    """
    captured = S.double().square().cumsum(-1)
    # A tiny slack absorbs rounding when energy is 1.
    reached = captured >= energy * total.double().unsqueeze(-1) * (1 - 1e-9)
    per_seq = torch.where(reached.any(-1), reached.int().argmax(-1) + 1, S.shape[-1])
    return int(per_seq.max())


def factor(
    A: torch.Tensor,
    *,
    rank: Optional[int] = None,
    energy: Optional[float] = None,
    seed: int = 0,
    oversample: int = 10,
    n_iter: int = 2,
) -> Factor:
    """Truncated SVD ``A [B, T, n] ≈ latent·basis`` via :func:`svdkernels.rsvd`.

    ``rank`` (capped at ``min(T, n)``; ``None``: full) or, with ``energy``, the
    smallest rank keeping that fraction of ``‖A‖_F²`` (at most ``rank``). Latent and
    basis come back in ``A``'s dtype.
    """
    B, T, n = A.shape
    cap = min(T, n) if rank is None else min(rank, T, n)
    if cap < 1:
        raise ValueError(f"A: expected at least one token and one feature, got shape {tuple(A.shape)}")
    _, S, Vh = rsvd(A, cap, oversample=oversample, n_iter=n_iter, seed=seed)
    r = cap
    if energy is not None:
        r = energy_rank(S, A.float().square().sum((1, 2)), energy)
    Vh = Vh[:, :r]
    latent = A.float() @ Vh.transpose(1, 2)
    return Factor(latent.to(A.dtype), Vh.to(A.dtype).contiguous(), S[:, :r].contiguous())


def _check_layers(name: str, xs: Sequence[torch.Tensor]) -> None:
    if isinstance(xs, torch.Tensor) or not isinstance(xs, Sequence) or len(xs) == 0:
        raise TypeError(f"{name}: expected a non-empty list of [B, T, Hkv*d] tensors (one per layer), "
                        f"got {type(xs).__name__}")
    for i, x in enumerate(xs):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name}[{i}]: expected a tensor [B, T, Hkv*d], got {got}")
        if x.dtype not in _DTYPES:
            raise TypeError(f"{name}[{i}]: expected dtype float32, bfloat16 or float16, got {x.dtype}")
        ref = xs[0]
        if x.shape[:2] != ref.shape[:2] or x.dtype != ref.dtype or x.device != ref.device:
            raise ValueError(f"{name}[{i}]: expected [B, T] = {list(ref.shape[:2])}, dtype {ref.dtype} and device "
                             f"{ref.device} (those of {name}[0]), got {list(x.shape[:2])}, {x.dtype}, {x.device}")
        if min(x.shape) < 1:
            raise ValueError(f"{name}[{i}]: expected [B, T, Hkv*d] with every dim >= 1, got {tuple(x.shape)}")
    for i, x in enumerate(xs):
        if x.device.type == "meta":
            raise ValueError(f"{name}[{i}]: expected a tensor with data (the ranks depend on the values), "
                             "got a meta tensor")
        # One read-only pass; the SVD of a NaN would fail the whole batch with "failed to converge".
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name}[{i}]: expected finite values, got NaN or inf (at "
                             f"{tuple(torch.nonzero(~torch.isfinite(x))[0].tolist())})")


def _check_rank(name: str, value: Optional[int]) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name}: expected None or an int >= 1, got {value!r}")


def check_settings(group_size: int, rank_k: Optional[int], rank_v: Optional[int], energy: Optional[float]) -> None:
    """``ValueError`` naming the first bad compression setting."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: expected an int >= 1, got {group_size!r}")
    _check_rank("rank_k", rank_k)
    _check_rank("rank_v", rank_v)
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                               or not 0 < energy <= 1):
        raise ValueError(f"energy: expected None or a number in (0, 1], got {energy!r}")


@strict_kwargs
def xkv_compress(
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    *,
    group_size: int = 2,
    rank_k: Optional[int] = None,
    rank_v: Optional[int] = None,
    energy: Optional[float] = None,
    seed: int = 0,
    oversample: int = 10,
    n_iter: int = 2,
) -> list[XKVGroup]:
    """Compress a model's KV cache with xKV's cross-layer SVD.

    Args:
        keys: one ``[B, T, Hkv*d]`` tensor per layer: pre-RoPE keys (``k_proj``'s
            output), float32/bfloat16/float16, finite (a NaN or inf is a
            ``ValueError`` naming the layer's entry, e.g. ``keys[3]``).
        values: likewise, the values.
        group_size: ``G``, adjacent layers sharing a latent (the last group may be
            smaller); 1 is per-layer SVD.
        rank_k, rank_v: latent width per group for keys and values (xKV uses 512 and
            768 for G = 4 on Llama-3.1-8B). ``None``: full rank. Always capped at
            ``min(T, G·Hkv·d)``.
        energy: instead pick, per group, the smallest rank keeping this fraction of
            the squared Frobenius norm (the largest over the batch, so the latent
            stays one tensor); ``rank_k`` / ``rank_v`` then cap it.
        seed: the rsvd seed (each group and each of keys/values derive their own).
        oversample, n_iter: rsvd settings.

    Returns:
        One :class:`XKVGroup` per group, in layer order; latents and bases in the
        keys' dtype.

    Example::

        groups = xkv_compress(keys, values, group_size=4, rank_k=512, rank_v=768)
        K0 = groups[0].keys(0)         # ≈ keys[0]
    """
    _check_layers("keys", keys)
    _check_layers("values", values)
    if len(values) != len(keys) or values[0].shape[:2] != keys[0].shape[:2]:
        raise ValueError(f"values: expected {len(keys)} layers of [B, T] = {list(keys[0].shape[:2])} (those of keys), "
                         f"got {len(values)} layers of {list(values[0].shape[:2])}")
    check_settings(group_size, rank_k, rank_v, energy)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**62:
        raise ValueError(f"seed: expected an int in [0, 2**62), got {seed!r}")
    for name, v in (("oversample", oversample), ("n_iter", n_iter)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
    groups = []
    for g, start in enumerate(range(0, len(keys), group_size)):
        layers = tuple(range(start, min(start + group_size, len(keys))))
        kf = factor(torch.cat([keys[i] for i in layers], dim=-1), rank=rank_k, energy=energy,
                    seed=seed + 2 * g, oversample=oversample, n_iter=n_iter)
        vf = factor(torch.cat([values[i] for i in layers], dim=-1), rank=rank_v, energy=energy,
                    seed=seed + 2 * g + 1, oversample=oversample, n_iter=n_iter)
        k_widths = [keys[i].shape[-1] for i in layers]
        v_widths = [values[i].shape[-1] for i in layers]
        groups.append(XKVGroup(
            layers,
            kf.latent,
            vf.latent,
            [b.contiguous() for b in kf.basis.split(k_widths, dim=-1)],
            [b.contiguous() for b in vf.basis.split(v_widths, dim=-1)],
            kf.singular_values,
            vf.singular_values,
        ))
    return groups
