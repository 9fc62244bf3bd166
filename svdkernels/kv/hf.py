"""Run a Hugging Face Llama-style model on a :class:`~svdkernels.kv.LowRankKVCache`.

Two pieces, both needed:

- :class:`LowRankHFCache`, a ``transformers.Cache`` to pass as ``generate(cache=...)``
  (or ``model(cache=...)``). It stores nothing itself: it wraps a ``LowRankKVCache``
  and reports its lengths, which is all ``generate`` and the mask code ask of it.
- :func:`patch_llama_attention`, which replaces ``forward`` on each attention module
  (the instances, not the class). The new forward runs only when the cache is a
  ``LowRankHFCache``: it projects q, k, v, rotates q with the model's own
  ``position_embeddings``, hands the *pre-RoPE* keys (xKV's requirement: the RoPE
  rotation would mix positions into the subspace) to the cache and attends through
  it. With any other cache, or none, the original forward runs unchanged.

The attention interface (``ALL_ATTENTION_FUNCTIONS``) is not the hook: it only sees
keys after RoPE and after ``cache.update``. The cache is the hook for storage, the
module's forward for attention.

Scope: Llama-style attention modules (``q_proj``/``k_proj``/``v_proj``/``o_proj``,
``head_dim``, ``scaling``, ``layer_idx``, and ``apply_rotary_pos_emb`` in the model's
file: Llama, Mistral, Qwen2...), RoPE types ``default`` and ``linear``, inference
only (no dropout), batches without padding (the attention mask is not read:
attention is causal over each whole sequence), greedy or sampled decoding (no beam
search: the cache cannot be reordered).
"""
from __future__ import annotations

import functools
import sys
from typing import Any, Optional

import torch
from torch import nn
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin

from svdkernels.kv.cache import LowRankKVCache
from svdkernels.ops.lowrank_attention import RoPE

_ORIGINAL = "_svdkernels_original_forward"


def rope_from_config(config: Any) -> RoPE:
    """The :class:`svdkernels.RoPE` of a Hugging Face config (``rope_parameters``).

    ``default`` and ``linear`` (positions divided by ``factor``) are supported; other
    rope types (llama3, yarn, dynamic...) raise ``ValueError``.
    """
    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    if rope_type == "default":
        scaling = 1.0
    elif rope_type == "linear":
        scaling = params["factor"]
    else:
        raise ValueError(f"config.rope_parameters: expected rope_type 'default' or 'linear', got {rope_type!r}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    rotary_dim = int(head_dim * partial)
    return RoPE(theta=float(theta), scaling=float(scaling), layout="neox",
                rotary_dim=None if rotary_dim == head_dim else rotary_dim)


class _LowRankLayer(CacheLayerMixin):
    """One layer's view of the low-rank cache, for ``transformers``' bookkeeping."""

    is_compileable = False
    is_sliding = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, lowrank: LowRankKVCache, layer_idx: int) -> None:
        super().__init__()
        self.lowrank, self.layer_idx = lowrank, layer_idx

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("LowRankHFCache.update: this model's attention is not patched; call "
                           "svdkernels.kv.patch_llama_attention(model) first")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.lowrank.seq_length(self.layer_idx)

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        pass  # the whole low-rank cache is reset at once, by LowRankHFCache.reset

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("LowRankHFCache: beam search (reordering the cache) is not supported")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("LowRankHFCache: cropping (assisted decoding) is not supported")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("LowRankHFCache: repeating the batch (num_return_sequences > 1) is not supported")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("LowRankHFCache: selecting batch rows is not supported")


class LowRankHFCache(Cache):
    """A ``transformers.Cache`` backed by a :class:`LowRankKVCache`.

    Args:
        config: the model's config (layers and RoPE are read from it).
        **settings: :class:`LowRankKVCache`'s settings (``group_size``, ``rank_k``,
            ``rank_v``, ``energy``, ``window``, ``seed``).

    Example::

        patch_llama_attention(model)
        cache = LowRankHFCache(model.config, group_size=2, rank_k=256, rank_v=384, window=64)
        out = model.generate(input_ids, cache=cache, max_new_tokens=100, do_sample=False)
    """

    def __init__(self, config: Any, **settings: Any) -> None:
        self.lowrank = LowRankKVCache(config.num_hidden_layers, rope=rope_from_config(config), **settings)
        super().__init__(layers=[_LowRankLayer(self.lowrank, i) for i in range(config.num_hidden_layers)])

    def reset(self) -> None:
        self.lowrank.reset()


def _is_llama_attention(module: nn.Module) -> bool:
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "layer_idx")
    return all(hasattr(module, n) for n in names)


def _lowrank_forward(
    module: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    attention_mask: Optional[torch.Tensor] = None,
    cache: Optional[Cache] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    cache = kwargs.pop("past_key_values", cache)
    original = getattr(module, _ORIGINAL)
    if not isinstance(cache, LowRankHFCache):
        return original(hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
                        cache=cache, **kwargs)
    B, S, _ = hidden_states.shape
    d = module.head_dim
    q = module.q_proj(hidden_states).view(B, S, -1, d).transpose(1, 2)
    # [B, S, Hkv*d] straight from the projections: the cache's layout, keys pre-RoPE.
    k, v = module.k_proj(hidden_states), module.v_proj(hidden_states)
    cos, sin = position_embeddings
    q, _ = sys.modules[type(module).__module__].apply_rotary_pos_emb(q, q, cos, sin)
    lowrank, layer = cache.lowrank, module.layer_idx
    if lowrank.seq_length(layer) == 0:
        lowrank.prefill(layer, k, v)
    else:
        lowrank.append(layer, k, v)
    out = lowrank.attend(layer, q, sm_scale=module.scaling)
    return module.o_proj(out.transpose(1, 2).reshape(B, S, -1)), None


def patch_llama_attention(model: nn.Module) -> int:
    """Make every Llama-style attention module of ``model`` use a :class:`LowRankHFCache`
    when one is passed as the cache; returns how many modules were patched.

    Idempotent; :func:`unpatch_llama_attention` restores the original forwards.
    """
    count = 0
    for module in model.modules():
        if not _is_llama_attention(module) or hasattr(module, _ORIGINAL):
            continue
        if not hasattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb"):
            raise ValueError(f"model: {type(module).__name__} is not Llama-style (its module "
                             f"{type(module).__module__} has no apply_rotary_pos_emb)")
        setattr(module, _ORIGINAL, module.forward)
        module.forward = functools.partial(_lowrank_forward, module)
        count += 1
    if count == 0 and not any(hasattr(m, _ORIGINAL) for m in model.modules()):
        raise ValueError(f"model: expected Llama-style attention modules (q_proj, k_proj, v_proj, o_proj, head_dim, "
                         f"scaling, layer_idx), found none in {type(model).__name__}")
    return count


def unpatch_llama_attention(model: nn.Module) -> None:
    """Undo :func:`patch_llama_attention`."""
    for module in model.modules():
        if hasattr(module, _ORIGINAL):
            original = getattr(module, _ORIGINAL)
            delattr(module, _ORIGINAL)
            del module.forward  # the partial set on the instance: the class's forward shows again
            if getattr(original, "__func__", None) is not type(module).forward:
                module.forward = original  # it was an instance attribute before the patch
