"""Low-rank KV caches built on :func:`svdkernels.lowrank_attention` and :func:`svdkernels.rsvd`.

- :func:`xkv_compress`: xKV's cross-layer SVD of a model's keys and values (Chang et al. 2025);
- :class:`LowRankKVCache`: latents for old tokens plus an exact window of recent ones;
- :class:`LowRankHFCache`, :func:`patch_llama_attention`: the cache inside a Hugging
  Face Llama-style model's ``generate`` (imported on first use: it imports transformers).
"""
from __future__ import annotations

from typing import Any

from svdkernels.kv.cache import LowRankKVCache
from svdkernels.kv.compress import XKVGroup, xkv_compress

_HF = ("LowRankHFCache", "patch_llama_attention", "rope_from_config", "unpatch_llama_attention")

__all__ = ["LowRankKVCache", "XKVGroup", "xkv_compress", *_HF]


def __getattr__(name: str) -> Any:
    # transformers is imported only when the Hugging Face glue is asked for.
    if name in _HF:
        from svdkernels.kv import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'svdkernels.kv' has no attribute {name!r}")
