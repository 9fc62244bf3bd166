"""A KV cache held as xKV latents plus an exact window of recent tokens.

Life of a token (per group of ``G`` adjacent layers, xKV, Chang et al. 2025):

1. ``prefill``: each layer's prompt keys (pre-RoPE) and values are stored exactly.
   Attention during the prompt is ordinary dense attention over them, as xKV and
   ShadowKV compress after prefill.
2. Compression, at the group's first ``append`` (or :meth:`LowRankKVCache.compress`):
   the group's bases come from a truncated SVD of the whole prompt
   (:func:`svdkernels.kv.compress.factor`, one basis per sequence, ShadowKV); every
   prompt token but the last ``window`` becomes a latent.
3. ``append``: new tokens enter the window. When it overflows, the oldest tokens
   are *projected onto the existing bases* (``c = Σ_l k_l·W_lᵀ``, the least-squares
   latent, since the group's basis rows are orthonormal); bases are never
   recomputed, so decode costs no SVD. The tokens of the current step always stay
   in the window, so every query sees the latents as strictly older tokens.

Attention for layer ``l`` (:meth:`LowRankKVCache.attend`) is
:func:`svdkernels.lowrank_attention` over the group's latents with layer ``l``'s
bases (causal=False: every latent precedes every query), merged through the
log-sum-exp with causal dense attention over the window, whose keys are stored
pre-RoPE like the latents and rotated at their absolute positions.

Bases are computed from the prompt only: tokens generated far from the prompt's
subspace are represented only as well as those bases allow (xKV's setting).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from svdkernels.errors import strict_kwargs
from svdkernels.kv.compress import check_settings, factor
from svdkernels.ops.lowrank_attention import RoPE, dense_attention, lowrank_attention_with_tail


class _Latents:
    """``[B, length, r]`` rows in a buffer that doubles when full (amortised O(1) appends)."""

    def __init__(self) -> None:
        self.data: Optional[torch.Tensor] = None
        self.length = 0

    def append(self, x: torch.Tensor) -> None:
        n = x.shape[1]
        if self.data is None or self.length + n > self.data.shape[1]:
            capacity = max(2 * (0 if self.data is None else self.data.shape[1]), self.length + n, 16)
            grown = x.new_empty(x.shape[0], capacity, x.shape[2])
            if self.data is not None:
                grown[:, : self.length] = self.data[:, : self.length]
            self.data = grown
        self.data[:, self.length : self.length + n] = x
        self.length += n

    def view(self) -> torch.Tensor:
        """The rows written so far (a view into the buffer); only once something was appended."""
        if self.data is None:
            raise RuntimeError("_Latents.view: nothing appended yet")
        return self.data[:, : self.length]

    @property
    def nbytes(self) -> int:
        if self.data is None:
            return 0
        return self.length * self.data.shape[0] * self.data.shape[2] * self.data.element_size()


@dataclass
class _Group:
    layers: tuple[int, ...]
    k_latent: _Latents = field(default_factory=_Latents)
    v_latent: _Latents = field(default_factory=_Latents)
    k_bases: Optional[list[torch.Tensor]] = None  # per layer [B, rk, Hkv*d]
    v_bases: Optional[list[torch.Tensor]] = None
    keep: int = 0  # tokens of the current step: never projected before they are attended


class LowRankKVCache:
    """Per-layer KV cache: xKV latents for old tokens, exact recent tokens.

    Args:
        num_layers: layers of the model.
        group_size: ``G`` adjacent layers sharing one latent (1: per-layer SVD).
        rank_k, rank_v: latent widths per group (``None``: full rank, i.e.
            ``min(prompt tokens, G·Hkv·d)``, lossless for the prompt and, once the
            prompt has at least ``G·Hkv·d`` tokens, for every later token).
        energy: choose ranks per group by retained energy instead (see
            :func:`svdkernels.kv.xkv_compress`); ``rank_k``/``rank_v`` then cap them.
        window: recent tokens kept exact per layer (the current step's tokens are
            always kept, even beyond it).
        rope: the model's :class:`svdkernels.RoPE` (keys are stored pre-RoPE);
            ``None`` for keys without RoPE (attention over the latents is absorbed).
        seed: rsvd seed.

    Keys and values are ``[B, S, Hkv*d]`` (``k_proj``/``v_proj`` output, keys before
    RoPE); every sequence of the batch has the same length (no padding). Inference only.
    """

    @strict_kwargs
    def __init__(
        self,
        num_layers: int,
        *,
        group_size: int = 2,
        rank_k: Optional[int] = None,
        rank_v: Optional[int] = None,
        energy: Optional[float] = None,
        window: int = 32,
        rope: Optional[RoPE] = None,
        seed: int = 0,
    ) -> None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers: expected an int >= 1, got {num_layers!r}")
        check_settings(group_size, rank_k, rank_v, energy)
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise ValueError(f"window: expected an int >= 0, got {window!r}")
        if rope is not None and not isinstance(rope, RoPE):
            raise TypeError(f"rope: expected None or svdkernels.RoPE, got {type(rope).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**62:
            raise ValueError(f"seed: expected an int in [0, 2**62), got {seed!r}")
        self.num_layers = num_layers
        self.group_size = group_size
        self.rank_k, self.rank_v, self.energy = rank_k, rank_v, energy
        self.window = window
        self.rope = rope
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        """Drop every token (settings are kept)."""
        self._k: list[Optional[torch.Tensor]] = [None] * self.num_layers  # window [B, W, Hkv*d]
        self._v: list[Optional[torch.Tensor]] = [None] * self.num_layers
        self._groups = [
            _Group(tuple(range(s, min(s + self.group_size, self.num_layers))))
            for s in range(0, self.num_layers, self.group_size)
        ]

    # -- bookkeeping ---------------------------------------------------------

    def _group(self, layer_idx: int) -> _Group:
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"layer_idx: expected an int in [0, {self.num_layers}), got {layer_idx!r}")
        return self._groups[layer_idx // self.group_size]

    def window_length(self, layer_idx: int) -> int:
        """Tokens of layer ``layer_idx`` held exactly."""
        self._group(layer_idx)
        k = self._k[layer_idx]
        return 0 if k is None else k.shape[1]

    def seq_length(self, layer_idx: int = 0) -> int:
        """Tokens cached for layer ``layer_idx`` (latents plus window)."""
        return self._group(layer_idx).k_latent.length + self.window_length(layer_idx)

    def nbytes(self) -> int:
        """Bytes held: latents, bases and windows."""
        total = sum(t.numel() * t.element_size() for t in self._k + self._v if t is not None)
        for g in self._groups:
            total += g.k_latent.nbytes + g.v_latent.nbytes
            total += sum(b.numel() * b.element_size() for b in (g.k_bases or []) + (g.v_bases or []))
        return total

    def dense_nbytes(self) -> int:
        """Bytes a dense cache of the same tokens, in the same dtype, would hold."""
        total = 0
        for layer, k in enumerate(self._k):
            if k is not None:
                total += 2 * self.seq_length(layer) * k.shape[0] * k.shape[2] * k.element_size()
        return total

    def _check_kv(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        for name, t in (("keys", keys), ("values", values)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected a tensor [B, S, Hkv*d], got {got}")
        if values.shape[:2] != keys.shape[:2] or values.dtype != keys.dtype or values.device != keys.device:
            raise ValueError(f"values: expected [B, S] = {list(keys.shape[:2])}, dtype {keys.dtype}, device "
                             f"{keys.device} (those of keys), got {list(values.shape[:2])}, {values.dtype}, "
                             f"{values.device}")
        ref = next((k for k in self._k if k is not None), None)
        if ref is not None and (keys.shape[0] != ref.shape[0] or keys.dtype != ref.dtype or keys.device != ref.device):
            raise ValueError(f"keys: expected batch {ref.shape[0]}, dtype {ref.dtype}, device {ref.device} (those "
                             f"already cached), got {keys.shape[0]}, {keys.dtype}, {keys.device}")
        mine = self._k[layer_idx]
        if mine is not None and (keys.shape[2] != mine.shape[2] or values.shape[2] != self._v[layer_idx].shape[2]):
            raise ValueError(f"keys: expected last dim {mine.shape[2]} (this layer's Hkv*d), got {keys.shape[2]}")
        for name, t in (("keys", keys), ("values", values)):
            if not t.is_floating_point():
                raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
            # A NaN would fail the whole group's SVD later, far from its source ("failed to converge").
            if t.device.type != "meta" and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}: expected finite values, got NaN or inf")

    # -- writing -------------------------------------------------------------

    def prefill(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store layer ``layer_idx``'s prompt: keys (pre-RoPE) and values ``[B, T, Hkv*d]``."""
        group = self._group(layer_idx)
        if self.seq_length(layer_idx) != 0:
            raise ValueError(f"layer_idx: layer {layer_idx} already holds {self.seq_length(layer_idx)} tokens; "
                             "prefill an empty cache (or call reset()), append to a filled one")
        self._check_kv(layer_idx, keys, values)
        if keys.shape[1] == 0:
            raise ValueError(f"keys: expected at least one prompt token, got shape {tuple(keys.shape)}")
        self._k[layer_idx], self._v[layer_idx] = keys, values
        group.keep = keys.shape[1]

    def append(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add new tokens ``[B, S, Hkv*d]`` to layer ``layer_idx``; compresses the
        group's prompt first if that has not happened yet."""
        group = self._group(layer_idx)
        if self.seq_length(layer_idx) == 0:
            raise ValueError(f"layer_idx: layer {layer_idx} is empty: prefill it before appending")
        self._check_kv(layer_idx, keys, values)
        if group.k_bases is None:
            self.compress(layer_idx // self.group_size)
        self._k[layer_idx] = torch.cat([self._k[layer_idx], keys], dim=1)
        self._v[layer_idx] = torch.cat([self._v[layer_idx], values], dim=1)
        group.keep = keys.shape[1]
        self._flush(group)

    def compress(self, group_idx: Optional[int] = None) -> None:
        """Compute the bases of group ``group_idx`` (all groups with ``None``) from the
        prompt its layers hold, and move all but the last ``window`` tokens to latents."""
        todo = range(len(self._groups)) if group_idx is None else [group_idx]
        for gi in todo:
            group = self._groups[gi]
            if group.k_bases is not None:
                continue
            empty = [layer for layer in group.layers if self._k[layer] is None]
            if empty:
                raise ValueError(f"group_idx: layers {empty} of group {gi} hold no prompt; prefill every layer "
                                 f"of the group {list(group.layers)} first")
            kf = factor(torch.cat([self._k[layer] for layer in group.layers], dim=-1), rank=self.rank_k,
                        energy=self.energy, seed=self.seed + 2 * gi)
            vf = factor(torch.cat([self._v[layer] for layer in group.layers], dim=-1), rank=self.rank_v,
                        energy=self.energy, seed=self.seed + 2 * gi + 1)
            group.k_bases = list(kf.basis.split([self._k[layer].shape[2] for layer in group.layers], dim=-1))
            group.v_bases = list(vf.basis.split([self._v[layer].shape[2] for layer in group.layers], dim=-1))
            group.keep = 0
            self._flush(group)

    def _flush(self, group: _Group) -> None:
        """Project the window's overflow onto the bases, once every layer of the group
        holds the same tokens (in a forward pass: at the group's last layer)."""
        if group.k_bases is None:
            return
        lengths = {self.window_length(layer) for layer in group.layers}
        if len(lengths) != 1:
            return
        n = lengths.pop() - max(self.window, group.keep)
        if n <= 0:
            return
        for latents, windows, bases in ((group.k_latent, self._k, group.k_bases),
                                        (group.v_latent, self._v, group.v_bases)):
            # c = Σ_l x_l·W_lᵀ = [x_1 | … | x_G]·Vhᵀ, accumulated in float32.
            c = sum(windows[layer][:, :n].float() @ b.float().transpose(1, 2) for layer, b in zip(group.layers, bases))
            latents.append(c.to(bases[0].dtype))
        for layer in group.layers:
            self._k[layer] = self._k[layer][:, n:]
            self._v[layer] = self._v[layer][:, n:]

    # -- reading -------------------------------------------------------------

    def attend(self, layer_idx: int, q: torch.Tensor, *, sm_scale: Optional[float] = None) -> torch.Tensor:
        """Causal attention of ``q [B, Hq, Sq, d]`` (RoPE applied; the last ``Sq`` cached
        tokens' queries) over everything layer ``layer_idx`` holds: ``[B, Hq, Sq, d]``."""
        group = self._group(layer_idx)
        k, v = self._k[layer_idx], self._v[layer_idx]
        if k is None:
            raise ValueError(f"layer_idx: layer {layer_idx} is empty: prefill it before attending")
        if not isinstance(q, torch.Tensor) or q.dim() != 4 or not 1 <= q.shape[2] <= k.shape[1] \
                or k.shape[2] % q.shape[3] or q.shape[0] != k.shape[0]:
            got = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
            raise ValueError(f"q: expected [B, Hq, Sq, d] with B = {k.shape[0]}, 1 <= Sq <= {k.shape[1]} (the "
                             f"window holds the queries' tokens) and d dividing {k.shape[2]}, got {got}")
        B, W, n = k.shape
        d = q.shape[3]
        # [B, W, Hkv*d] -> [B, Hkv, W, d] views: no copies of the window.
        k_tail = k.view(B, W, n // d, d).transpose(1, 2)
        v_tail = v.view(B, W, n // d, d).transpose(1, 2)
        if group.k_latent.length == 0:
            return dense_attention(q, k_tail, v_tail, rope=self.rope, k_start=0, causal=True, sm_scale=sm_scale)[0]
        i = group.layers.index(layer_idx)
        return lowrank_attention_with_tail(
            q, group.k_latent.view(), group.v_latent.view(), group.k_bases[i], group.v_bases[i], k_tail, v_tail,
            rope=self.rope, sm_scale=sm_scale,
        )
