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

import dataclasses
import json
import os
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from svdkernels.errors import FormatError
from svdkernels.formats.int4 import GROUP_SIZE
from svdkernels.ops.lowrank_quant import RANK_MULTIPLE
from svdkernels.quant.linear import ACTS, WEIGHTS, LowRankQuantLinear
from svdkernels.quant.model import LayerChoice, QuantConfig

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


_METADATA_KEYS = frozenset({"format", "svdkernels.format", "svdkernels.format_version", "svdkernels.layers",
                            "svdkernels.quant_config"})
_LAYER_KEYS = frozenset({"in_features", "out_features", "rank", "acts", "unsigned", "dtype", "bias"})
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_CHOICE_FIELDS = {f.name for f in dataclasses.fields(LayerChoice)}
_CONFIG_FIELDS = {f.name for f in dataclasses.fields(QuantConfig)}


def _is_int(v: object, low: int = 0) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and v >= low


def _is_number(v: object) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float))


def _read(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:  # SafetensorError, OSError, ...: not a safetensors file
        raise FormatError(path, f"expected a safetensors file written by save_quantized, got an unreadable one "
                                f"({type(e).__name__}: {e})") from e
    fmt, version = metadata.get("svdkernels.format"), metadata.get("svdkernels.format_version")
    if fmt != FORMAT or "svdkernels.layers" not in metadata:
        raise FormatError(path, f"expected metadata svdkernels.format = {FORMAT!r} and svdkernels.layers "
                                f"(a file written by save_quantized), got format {fmt!r}")
    if version != FORMAT_VERSION:
        raise FormatError(path, f"expected format version {FORMAT_VERSION}, got {version!r}")
    unknown = set(metadata) - _METADATA_KEYS
    if unknown:
        raise FormatError(path, f"unexpected metadata keys {sorted(unknown)} (expected {sorted(_METADATA_KEYS)})")
    return metadata, tensors


def _json(path: str | os.PathLike, metadata: dict[str, str], key: str) -> Any:
    try:
        return json.loads(metadata[key])
    except ValueError as e:
        raise FormatError(path, f"metadata {key!r} is not valid JSON ({e})") from e


def _check_layer_table(path: str | os.PathLike, layers: object) -> dict[str, dict[str, Any]]:
    if not isinstance(layers, dict) or not layers:
        raise FormatError(path, "expected metadata 'svdkernels.layers' to be a non-empty JSON object of layers, "
                                f"got {layers!r:.80}")
    for name, info in layers.items():
        where = f"layer {name!r}"
        if not isinstance(info, dict) or set(info) != _LAYER_KEYS:
            got = sorted(info) if isinstance(info, dict) else type(info).__name__
            raise FormatError(path, f"{where}: expected keys {sorted(_LAYER_KEYS)}, got {got}")
        for key in ("in_features", "out_features"):
            if not _is_int(info[key], 1):
                raise FormatError(path, f"{where}: expected {key} a positive int, got {info[key]!r}")
        if info["in_features"] % GROUP_SIZE:
            raise FormatError(path, f"{where}: expected in_features a multiple of {GROUP_SIZE}, "
                                    f"got {info['in_features']}")
        r = info["rank"]
        if not _is_int(r) or r % RANK_MULTIPLE or r > min(info["in_features"], info["out_features"]):
            raise FormatError(path, f"{where}: expected rank a multiple of {RANK_MULTIPLE} in [0, "
                                    f"min(in_features, out_features)], got {r!r}")
        if info["acts"] not in ACTS:
            raise FormatError(path, f"{where}: expected acts 'int4' or null, got {info['acts']!r}")
        for key in ("unsigned", "bias"):
            if not isinstance(info[key], bool):
                raise FormatError(path, f"{where}: expected {key} a bool, got {info[key]!r}")
        if info["unsigned"] and (info["acts"] is None or not info["bias"]):
            raise FormatError(path, f"{where}: unsigned = true needs acts = 'int4' and the compensated bias "
                                    f"(bias = true), got acts {info['acts']!r}, bias {info['bias']!r}")
        if not isinstance(info["dtype"], str) or info["dtype"] not in _DTYPES:
            raise FormatError(path, f"{where}: expected dtype one of {sorted(_DTYPES)}, got {info['dtype']!r}")
    return layers


def _check_tensors(path: str | os.PathLike, layers: dict[str, dict[str, Any]],
                   tensors: dict[str, torch.Tensor]) -> None:
    """The exact set of tensor names, every shape and dtype against the layer
    table, and finiteness; :class:`FormatError` naming the tensor otherwise."""
    want = {f"{name}.{buf}" for name, info in layers.items() for buf in _BUFFERS if buf != "bias" or info["bias"]}
    if set(tensors) != want:
        missing, unexpected = sorted(want - set(tensors)), sorted(set(tensors) - want)
        raise FormatError(path, f"expected tensors {sorted(want)[:12]}{' ...' if len(want) > 12 else ''}; "
                                f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    for name, info in layers.items():
        N, K, r, dtype = info["out_features"], info["in_features"], info["rank"], _DTYPES[info["dtype"]]
        spec = {"qweight": ((N, K // 2), torch.uint8), "scales": ((N, K // GROUP_SIZE), dtype),
                "L_down": ((r, K), dtype), "L_up": ((N, r), dtype), "smooth": ((K,), torch.float32),
                "bias": ((N,), dtype)}
        for buf, (shape, dt) in spec.items():
            key = f"{name}.{buf}"
            if key not in tensors:
                continue
            t = tensors[key]
            if tuple(t.shape) != shape:
                raise FormatError(path, f"tensor {key!r} of layer {name!r}: expected shape {list(shape)} (from the "
                                        f"layer table: N = {N}, K = {K}, rank = {r}), got {list(t.shape)}")
            if t.dtype != dt:
                raise FormatError(path, f"tensor {key!r} of layer {name!r}: expected dtype {dt} (the layer's "
                                        f"dtype {info['dtype']}), got {t.dtype}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise FormatError(path, f"tensor {key!r} of layer {name!r}: expected finite values, got NaN or inf")
        if not bool((tensors[f"{name}.smooth"] > 0).all()):
            raise FormatError(path, f"tensor '{name}.smooth': expected positive smoothing factors, got a value <= 0")
        if not bool((tensors[f"{name}.scales"] >= 0).all()):
            raise FormatError(path, f"tensor '{name}.scales': expected non-negative scales, got a negative one")


def _parse_config(path: str | os.PathLike, metadata: dict[str, str],
                  layers: dict[str, dict[str, Any]]) -> Optional[QuantConfig]:
    """The saved :class:`QuantConfig`, checked key by key; each layer it records must
    agree with the layer table on ``acts`` and ``unsigned`` (a flipped flag in one of
    the two is caught here)."""
    if "svdkernels.quant_config" not in metadata:
        return None
    d = _json(path, metadata, "svdkernels.quant_config")
    if not isinstance(d, dict) or not set(d) <= _CONFIG_FIELDS:
        got = sorted(set(d) - _CONFIG_FIELDS) if isinstance(d, dict) else type(d).__name__
        raise FormatError(path, f"quant_config: expected keys among {sorted(_CONFIG_FIELDS)}, got unknown {got}")
    bad = None
    if d.get("weights", "int4") not in WEIGHTS:
        bad = "weights"
    elif d.get("acts", "int4") not in ACTS:
        bad = "acts"
    elif not _is_int(d.get("rank", 0)) or not _is_int(d.get("refine_iters", 0)):
        bad = "rank / refine_iters"
    elif d.get("act_stat", "rms") not in ("rms", "absmax"):
        bad = "act_stat"
    elif d.get("dtype") is not None and (not isinstance(d["dtype"], str)
                                         or d["dtype"] not in {f"torch.{k}" for k in _DTYPES}):
        bad = "dtype"
    elif d.get("alphas") is not None and not (isinstance(d["alphas"], list) and all(
            _is_number(a) and 0 <= a <= 1 for a in d["alphas"])):
        bad = "alphas"
    elif not isinstance(d.get("skipped", {}), dict) or not isinstance(d.get("layers", {}), dict):
        bad = "skipped / layers"
    if bad:
        raise FormatError(path, f"quant_config: malformed {bad} ({ {k: d.get(k) for k in bad.split(' / ')} })")
    for name, c in d.get("layers", {}).items():
        where = f"quant_config layer {name!r}"
        if not isinstance(c, dict) or not {"rank", "acts", "unsigned"} <= set(c) <= _CHOICE_FIELDS:
            got = sorted(c) if isinstance(c, dict) else type(c).__name__
            raise FormatError(path, f"{where}: expected keys among {sorted(_CHOICE_FIELDS)}, got {got}")
        if c["acts"] not in ACTS or not isinstance(c["unsigned"], bool) or not _is_int(c["rank"]) or not all(
                c.get(k) is None or _is_number(c[k]) for k in ("alpha", "calib_mse", "calib_sqnr_db",
                                                               "weight_rel_error")) or not isinstance(
                c.get("refined", False), bool):
            raise FormatError(path, f"{where}: malformed entry {c!r}")
        if c.get("alpha") is not None and not 0 <= c["alpha"] <= 1:
            raise FormatError(path, f"{where}: expected alpha in [0, 1], got {c['alpha']!r}")
        info = layers.get(name)
        if info is not None and (info["acts"], info["unsigned"]) != (c["acts"], c["unsigned"]):
            raise FormatError(path, f"layer {name!r}: the layer table says acts = {info['acts']!r}, unsigned = "
                                    f"{info['unsigned']!r} but quant_config recorded acts = {c['acts']!r}, "
                                    f"unsigned = {c['unsigned']!r}")
    try:
        return QuantConfig.from_json(metadata["svdkernels.quant_config"])
    except (TypeError, ValueError) as e:
        raise FormatError(path, f"quant_config: {e}") from e


def load_quantized(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Replace the layers saved in ``path`` in ``model`` (the original float model,
    same architecture), in place, and return it (for a bare ``nn.Linear``, the
    quantised layer that replaces it); its outputs are bit-identical to those of
    the model that was saved. Tensors go to the device of the layer they replace;
    ``model.svdkernels_quant_config`` is restored when the file has one.

    The whole file is checked before the model changes: format and version, the
    metadata keys, the layer table's keys, types and ranges, the exact set of
    tensor names, every tensor's shape and dtype against the table, finiteness,
    positive smoothing factors, and the saved config's agreement with the table.

    Raises:
        FileNotFoundError: no such file.
        svdkernels.errors.FormatError (a ``ValueError``): not a valid file written
            by :func:`save_quantized` (naming the file, the layer or tensor, and what
            is wrong).
        ValueError: a layer missing from ``model`` or of another shape.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    metadata, tensors = _read(path)
    layers = _check_layer_table(path, _json(path, metadata, "svdkernels.layers"))
    _check_tensors(path, layers, tensors)
    config = _parse_config(path, metadata, layers)
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
        parts = {buf: tensors[f"{name}.{buf}"].to(device) if f"{name}.{buf}" in tensors else None for buf in _BUFFERS}
        try:
            built[name] = LowRankQuantLinear(**parts, acts=info["acts"], unsigned=info["unsigned"])
        except (TypeError, ValueError) as e:
            raise FormatError(path, f"layer {name!r}: {e}") from e
    for name, layer in built.items():  # replaced only once every layer loaded
        if name == "":
            model = layer
        else:
            model.set_submodule(name, layer)
    if config is not None:
        model.svdkernels_quant_config = config
    return model
