"""Input checks shared by the trainer layer's model-rewriting entry points."""
from __future__ import annotations

from torch import nn

from svdkernels.errors import all_finite


def check_finite_weights(layers: dict[str, nn.Module], name: str = "model") -> None:
    """``ValueError`` naming ``name`` and the layer when a target weight holds NaN or inf.

    ``layers``: ``{qualified name: layer with a .weight}``. Called before an SVD of the
    weights, which would otherwise fail with LAPACK's ``LinAlgError`` (or, on CUDA,
    return NaN factors silently).
    """
    for lname, layer in layers.items():
        if not all_finite(layer.weight.detach()):
            raise ValueError(f"{name}: expected finite weights in the target layers, got NaN or inf in "
                             f"{lname + '.' if lname else ''}weight")
