"""Save and load SVDQuant-quantised models (safetensors only; never pickle).

File format (one ``.safetensors`` file)
---------------------------------------
Tensors, per :class:`~svdkernels.quant.linear.LowRankQuantLinear` named ``<name>``
in the model: ``<name>.qweight`` ``[N, K/2]`` uint8, ``<name>.scales`` ``[N, K/64]``,
``<name>.L_down`` ``[r, K]``, ``<name>.L_up`` ``[N, r]`` (compute dtype),
``<name>.smooth`` ``[K]`` float32 and, when the layer has one, ``<name>.bias``
``[N]`` (compensated for the unsigned shift when ``unsigned``): the layer's
buffers exactly, so a loaded model computes bit-identical outputs.

Metadata (safetensors string metadata):

- ``"format"``: ``"pt"`` (the safetensors convention for torch tensors);
- ``"svdkernels.format"``: :data:`FORMAT` and ``"svdkernels.format_version"``:
  :data:`FORMAT_VERSION`;
- ``"svdkernels.layers"``: JSON ``{name: {"in_features", "out_features", "rank",
  "acts", "unsigned", "dtype", "bias"}}``;
- ``"svdkernels.quant_config"`` (when the model has one): the JSON of
  :class:`~svdkernels.quant.model.QuantConfig`.

Only the quantised layers are stored: :func:`load_quantized` takes the original
float model (same architecture) and replaces those layers in it.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from svdkernels.quant.linear import LowRankQuantLinear
from svdkernels.quant.model import QuantConfig

FORMAT = "svdkernels.svdquant.int4"
"""The value of the ``svdkernels.format`` metadata key."""

FORMAT_VERSION = "1"
"""Incremented when the layout changes incompatibly."""

_BUFFERS = ("qweight", "scales", "L_down", "L_up", "smooth", "bias")

__all__ = ["FORMAT", "FORMAT_VERSION", "load_quantized", "save_quantized"]


def save_quantized(model: nn.Module, path: str | os.PathLike) -> None:
    """Write every :class:`LowRankQuantLinear` of ``model`` to ``path`` (module docstring).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``model`` has no quantised layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if not isinstance(m, LowRankQuantLinear):
            continue
        for buf in _BUFFERS:
            t = getattr(m, buf)
            if t is not None:
                tensors[f"{name}.{buf}"] = t.detach().contiguous().cpu()
        layers[name] = {
            "in_features": m.in_features, "out_features": m.out_features, "rank": m.rank, "acts": m.acts,
            "unsigned": m.unsigned, "dtype": str(m.dtype).removeprefix("torch."), "bias": m.bias is not None,
        }
    if not layers:
        raise ValueError("model: expected at least one LowRankQuantLinear layer (run quantize_model first), got none")
    metadata = {
        "format": "pt",
        "svdkernels.format": FORMAT,
        "svdkernels.format_version": FORMAT_VERSION,
        "svdkernels.layers": json.dumps(layers),
    }
    config = getattr(model, "svdkernels_quant_config", None)
    if isinstance(config, QuantConfig):
        metadata["svdkernels.quant_config"] = config.to_json()
    save_file(tensors, os.fspath(path), metadata=metadata)


def _read(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"path: expected a safetensors file written by save_quantized, got {path!s} ({e})") from e
    fmt, version = metadata.get("svdkernels.format"), metadata.get("svdkernels.format_version")
    if fmt != FORMAT or "svdkernels.layers" not in metadata:
        raise ValueError(
            f"path: expected a file with metadata svdkernels.format = {FORMAT!r} (written by save_quantized), "
            f"got {fmt!r} in {path!s}"
        )
    if version != FORMAT_VERSION:
        raise ValueError(f"path: expected format version {FORMAT_VERSION}, got {version!r} in {path!s}")
    return metadata, tensors


def load_quantized(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Replace the layers saved in ``path`` in ``model`` (the original float model,
    same architecture), in place, and return it; its outputs are bit-identical to
    those of the model that was saved. Tensors go to the device of the layer they
    replace; ``model.svdkernels_quant_config`` is restored when the file has one.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a file written by :func:`save_quantized` (or another
            version), a layer missing from ``model`` or of another shape, a tensor
            missing or of the wrong shape or dtype (the layer is named).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    metadata, tensors = _read(path)
    layers = json.loads(metadata["svdkernels.layers"])
    built = {}
    for name, info in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"model: expected a layer named {name!r} (saved in {path!s}), got none") from None
        if not isinstance(old, (nn.Linear, LowRankQuantLinear)):
            raise ValueError(f"model: expected {name!r} to be an nn.Linear, got {type(old).__name__}")
        want = (info["out_features"], info["in_features"])
        if (old.out_features, old.in_features) != want:
            raise ValueError(
                f"model: layer {name!r} expected [out_features, in_features] = {list(want)} (as saved), "
                f"got {[old.out_features, old.in_features]}"
            )
        device = (old.weight if isinstance(old, nn.Linear) else old.qweight).device
        parts = {}
        for buf in _BUFFERS:
            key = f"{name}.{buf}"
            if key not in tensors and not (buf == "bias" and not info["bias"]):
                raise ValueError(f"path: expected tensor {key!r} in {path!s}, got none")
            parts[buf] = tensors[key].to(device) if key in tensors else None
        qw = parts["qweight"]
        if tuple(qw.shape) != (want[0], want[1] // 2):
            raise ValueError(
                f"path: tensor {name + '.qweight'!r} expected shape [N, K/2] = {[want[0], want[1] // 2]}, "
                f"got {list(qw.shape)}"
            )
        try:
            built[name] = LowRankQuantLinear(**parts, acts=info["acts"], unsigned=info["unsigned"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"path: layer {name!r} in {path!s}: {e}") from e
    for name, layer in built.items():  # replaced only once every layer loaded
        model.set_submodule(name, layer)
    if "svdkernels.quant_config" in metadata:
        model.svdkernels_quant_config = QuantConfig.from_json(metadata["svdkernels.quant_config"])
    return model
