"""Input checks shared by the trainer layer's model-rewriting entry points."""
from __future__ import annotations

import torch
from torch import nn


def check_finite_weights(layers: dict[str, nn.Module], name: str = "model") -> None:
    """``ValueError`` naming ``name`` and the layer when a target weight holds NaN or inf.

    ``layers``: ``{qualified name: layer with a .weight}``. Called before an SVD of the
    weights, which would otherwise fail with LAPACK's ``LinAlgError`` (or, on CUDA,
    return NaN factors silently). A finite float64 sum proves every entry finite in one
    read-only pass; only a non-finite sum (huge finite weights can give one) needs the
    entrywise check.
    """
    for lname, layer in layers.items():
        W = layer.weight.detach()
        if not torch.isfinite(W.sum(dtype=torch.float64)) and not bool(torch.isfinite(W).all()):
            raise ValueError(f"{name}: expected finite weights in the target layers, got NaN or inf in "
                             f"{lname + '.' if lname else ''}weight")
