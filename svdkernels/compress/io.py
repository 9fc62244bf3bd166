"""Save and load compressed models (safetensors only; never pickle).

File format (one ``.safetensors`` file): per :class:`LowRankLinear` named
``<name>``, ``<name>.up`` ``[out, r]``, ``<name>.bias`` ``[out]`` when it has one,
and ``<name>.down`` ``[r, in]``, except when ``down`` is shared with an earlier layer
(Basis Sharing), which is then stored once under the first layer's name. Metadata
``"svdkernels.format"`` = :data:`FORMAT`, ``"svdkernels.format_version"`` and
``"svdkernels.layers"``: JSON ``{name: {"in_features", "out_features", "rank",
"bias", "down"}}`` (``down``: the name whose ``.down`` tensor the layer uses).

Only the low-rank layers are stored: :func:`load_compressed` takes the original
model (same architecture) and replaces those layers in it, tensors exactly as saved.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from svdkernels.adapters.modules import set_module
from svdkernels.compress.linear import LowRankLinear

FORMAT = "svdkernels.lowrank"
FORMAT_VERSION = "1"

__all__ = ["FORMAT", "FORMAT_VERSION", "load_compressed", "save_compressed"]


def save_compressed(model: nn.Module, path: str | os.PathLike) -> None:
    """Write every :class:`LowRankLinear` of ``model`` to ``path`` (module docstring).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``model`` has no low-rank layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    owner: dict[int, str] = {}  # id(down parameter) -> the layer it is stored under
    for name, m in model.named_modules(remove_duplicate=False):
        if not isinstance(m, LowRankLinear):
            continue
        down_of = owner.setdefault(id(m.down), name)
        if down_of == name:
            tensors[f"{name}.down"] = m.down.detach().contiguous().cpu()
        tensors[f"{name}.up"] = m.up.detach().contiguous().cpu()
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach().contiguous().cpu()
        layers[name] = {"in_features": m.in_features, "out_features": m.out_features, "rank": m.rank,
                        "bias": m.bias is not None, "down": down_of}
    if not layers:
        raise ValueError("model: expected a model with LowRankLinear layers (compress_model), got none")
    meta = {"format": "pt", "svdkernels.format": FORMAT, "svdkernels.format_version": FORMAT_VERSION,
            "svdkernels.layers": json.dumps(layers)}
    save_file(tensors, str(path), metadata=meta)


def load_compressed(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Replace the layers stored in ``path`` by :class:`LowRankLinear` in ``model``
    (the original architecture), in place, on the device of the layer replaced.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: not a file of this format, or a stored layer missing from ``model``
            or of another shape.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"path: cannot read {os.fspath(path)!r} as safetensors: {e}") from e
    if meta.get("svdkernels.format") != FORMAT:
        raise ValueError(f"path: expected a file of format {FORMAT!r}, got {meta.get('svdkernels.format')!r}")
    if meta.get("svdkernels.format_version") != FORMAT_VERSION:
        raise ValueError(f"path: expected format version {FORMAT_VERSION}, got {meta.get('svdkernels.format_version')!r}")
    layers = json.loads(meta["svdkernels.layers"])
    modules = dict(model.named_modules())
    new: dict[str, LowRankLinear] = {}
    shared: dict[str, nn.Parameter] = {}
    for name, info in layers.items():
        old = modules.get(name)
        if old is None:
            raise ValueError(f"model: the file has layer {name!r}, which the model does not")
        shape = (getattr(old, "out_features", None), getattr(old, "in_features", None))
        if shape != (info["out_features"], info["in_features"]):
            raise ValueError(f"model: layer {name!r} is {shape[0]}x{shape[1]}, the file's is "
                             f"{info['out_features']}x{info['in_features']}")
        device = next(old.parameters()).device
        key = info["down"]
        if key not in shared:
            shared[key] = nn.Parameter(tensors[f"{key}.down"].to(device))
        bias = tensors[f"{name}.bias"].to(device) if info["bias"] else None
        new[name] = LowRankLinear(tensors[f"{name}.up"].to(device), shared[key], bias)
    for name, layer in new.items():
        set_module(model, name, layer)
    return model
