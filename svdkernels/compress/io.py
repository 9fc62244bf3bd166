"""Save and load compressed models (safetensors only; never pickle).

File format (one ``.safetensors`` file): per :class:`LowRankLinear` named
``<name>``, ``<name>.up`` ``[out, r]``, ``<name>.bias`` ``[out]`` when it has one,
and ``<name>.down`` ``[r, in]``, except when ``down`` is shared with an earlier layer
(Basis Sharing), which is then stored once under the first layer's name. Metadata
``"svdkernels.format"`` = :data:`FORMAT`, ``"svdkernels.format_version"`` and
``"svdkernels.layers"``: JSON ``{name: {"in_features", "out_features", "rank",
"bias", "down", "factors"}}`` (``down``: the name whose ``.down`` tensor the layer
uses; ``factors``: ``"float"``, or ``"int4"`` for a :class:`LowRankInt4Linear`, stored as
``<name>.qdown``/``.sdown``/``.qup``/``.sup`` with the rank padded to a multiple of 64).

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
from svdkernels.compress.linear import LowRankInt4Linear, LowRankLinear
from svdkernels.errors import FormatError
from svdkernels.formats.int4 import GROUP_SIZE

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
        if isinstance(m, LowRankInt4Linear):
            for key in ("qdown", "sdown", "qup", "sup"):
                tensors[f"{name}.{key}"] = getattr(m, key).detach().contiguous().cpu()
            if m.bias is not None:
                tensors[f"{name}.bias"] = m.bias.detach().contiguous().cpu()
            layers[name] = {"in_features": m.in_features, "out_features": m.out_features, "rank": m.rank,
                            "bias": m.bias is not None, "down": name, "factors": "int4"}
            continue
        if not isinstance(m, LowRankLinear):
            continue
        down_of = owner.setdefault(id(m.down), name)
        if down_of == name:
            tensors[f"{name}.down"] = m.down.detach().contiguous().cpu()
        tensors[f"{name}.up"] = m.up.detach().contiguous().cpu()
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach().contiguous().cpu()
        layers[name] = {"in_features": m.in_features, "out_features": m.out_features, "rank": m.rank,
                        "bias": m.bias is not None, "down": down_of, "factors": "float"}
    if not layers:
        raise ValueError("model: expected a model with LowRankLinear or LowRankInt4Linear layers "
                         "(compress_model), got none")
    meta = {"format": "pt", "svdkernels.format": FORMAT, "svdkernels.format_version": FORMAT_VERSION,
            "svdkernels.layers": json.dumps(layers)}
    save_file(tensors, str(path), metadata=meta)


def _read(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise FormatError(path, f"not a readable safetensors file ({e})") from e


_LAYER_KEYS = {"in_features": int, "out_features": int, "rank": int, "bias": bool, "down": str, "factors": str}
_FACTORS = ("float", "int4")


def _layer_table(path: str | os.PathLike, meta: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The ``svdkernels.layers`` table, every entry's keys, types and ranges checked."""
    if meta.get("svdkernels.format") != FORMAT:
        raise FormatError(path, f"format {meta.get('svdkernels.format')!r}, expected {FORMAT!r}")
    if meta.get("svdkernels.format_version") != FORMAT_VERSION:
        raise FormatError(path, f"format version {meta.get('svdkernels.format_version')!r}, expected {FORMAT_VERSION!r}")
    unknown = set(meta) - {"format", "svdkernels.format", "svdkernels.format_version", "svdkernels.layers"}
    if unknown:
        raise FormatError(path, f"unknown metadata keys {sorted(unknown)}")
    try:
        layers = json.loads(meta["svdkernels.layers"])
    except KeyError:
        raise FormatError(path, "no 'svdkernels.layers' metadata") from None
    except json.JSONDecodeError as e:
        raise FormatError(path, f"'svdkernels.layers' is not valid JSON ({e})") from None
    if not isinstance(layers, dict) or not layers:
        raise FormatError(path, "'svdkernels.layers' must be a non-empty object of layers")
    for name, info in layers.items():
        if not isinstance(info, dict) or set(info) != set(_LAYER_KEYS):
            raise FormatError(path, f"layer {name!r}: expected the keys {sorted(_LAYER_KEYS)}, got "
                                    f"{sorted(info) if isinstance(info, dict) else type(info).__name__}")
        for key, kind in _LAYER_KEYS.items():
            value = info[key]
            if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 1)):
                raise FormatError(path, f"layer {name!r}: {key} must be a {'positive int' if kind is int else kind.__name__}, "
                                        f"got {value!r}")
        if info["factors"] not in _FACTORS:
            raise FormatError(path, f"layer {name!r}: factors must be one of {_FACTORS}, got {info['factors']!r}")
        if info["down"] not in layers:
            raise FormatError(path, f"layer {name!r}: its down factor {info['down']!r} is not a stored layer")
        if info["factors"] == "int4" and info["down"] != name:
            raise FormatError(path, f"layer {name!r}: int4 factors are never shared, got down {info['down']!r}")
        if info["factors"] == "float" and layers[info["down"]]["factors"] != "float":
            raise FormatError(path, f"layer {name!r}: shares the down factor of int4 layer {info['down']!r}")
    return layers


def _check_tensors(path: str | os.PathLike, layers: dict[str, dict[str, Any]], tensors: dict[str, torch.Tensor]) -> None:
    """The exact set of tensor names, each one's shape, a float dtype shared by a layer's
    tensors, and finiteness."""
    expected: dict[str, tuple[int, ...]] = {}
    packed: set[str] = set()
    for name, info in layers.items():
        r, n_in, n_out = info["rank"], info["in_features"], info["out_features"]
        if info["bias"]:
            expected[f"{name}.bias"] = (n_out,)
        if info["factors"] == "int4":
            if n_in % GROUP_SIZE:
                raise FormatError(path, f"layer {name!r}: int4 factors need in_features a multiple of {GROUP_SIZE}, "
                                        f"got {n_in}")
            R = -(-r // GROUP_SIZE) * GROUP_SIZE
            expected.update({f"{name}.qdown": (R, n_in // 2), f"{name}.sdown": (R, n_in // GROUP_SIZE),
                             f"{name}.qup": (n_out, R // 2), f"{name}.sup": (n_out, R // GROUP_SIZE)})
            packed |= {f"{name}.qdown", f"{name}.qup"}
            continue
        expected[f"{name}.up"] = (n_out, r)
        owner = layers[info["down"]]
        if (owner["rank"], owner["in_features"]) != (r, n_in):
            raise FormatError(path, f"layer {name!r} shares {info['down']!r}'s down factor, whose shape "
                                    f"[{owner['rank']}, {owner['in_features']}] is not its [{r}, {n_in}]")
        expected[f"{info['down']}.down"] = (r, n_in)
    missing, extra = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or extra:
        raise FormatError(path, f"tensors missing {sorted(missing)[:4]}, unexpected {sorted(extra)[:4]}")
    for key, shape in expected.items():
        t = tensors[key]
        if tuple(t.shape) != shape:
            raise FormatError(path, f"tensor {key!r} has shape {list(t.shape)}, expected {list(shape)}")
        if key in packed:
            if t.dtype != torch.uint8:
                raise FormatError(path, f"tensor {key!r} has dtype {t.dtype}, expected torch.uint8 (packed int4)")
            continue
        if not t.is_floating_point():
            raise FormatError(path, f"tensor {key!r} has dtype {t.dtype}, expected a floating dtype")
        if not bool(torch.isfinite(t).all()):
            raise FormatError(path, f"tensor {key!r} has NaN or infinite entries")
    for name, info in layers.items():
        keys = ([f"{name}.sdown", f"{name}.sup"] if info["factors"] == "int4" else [f"{name}.up", f"{info['down']}.down"])
        keys += [f"{name}.bias"] if info["bias"] else []
        dtypes = {tensors[k].dtype for k in keys}
        if len(dtypes) != 1:
            raise FormatError(path, f"layer {name!r}: its tensors {keys} have different dtypes {sorted(map(str, dtypes))}")
        if info["factors"] == "int4" and tensors[keys[0]].dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise FormatError(path, f"layer {name!r}: int4 scales must be float32, float16 or bfloat16, "
                                    f"got {tensors[keys[0]].dtype}")


def load_compressed(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Replace the layers stored in ``path`` by :class:`LowRankLinear` (or
    :class:`LowRankInt4Linear`) layers in ``model``
    (the original architecture), in place, on the device of the layer replaced. The
    whole file is checked before the model changes.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        FileNotFoundError: ``path`` does not exist.
        svdkernels.FormatError: the file is not a valid file of this format (unreadable,
            unknown version or metadata, a malformed layer table, a missing, extra,
            misshapen, non-float or non-finite tensor).
        ValueError: a stored layer is missing from ``model`` or of another shape.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    meta, tensors = _read(path)
    layers = _layer_table(path, meta)
    _check_tensors(path, layers, tensors)
    modules = dict(model.named_modules())
    for name, info in layers.items():
        old = modules.get(name)
        if old is None:
            raise ValueError(f"model: the file has layer {name!r}, which the model does not")
        shape = (getattr(old, "out_features", None), getattr(old, "in_features", None))
        if shape != (info["out_features"], info["in_features"]):
            raise ValueError(f"model: layer {name!r} is {shape[0]}x{shape[1]}, the file's is "
                             f"{info['out_features']}x{info['in_features']}")
    new: dict[str, nn.Module] = {}
    shared: dict[str, nn.Parameter] = {}
    for name, info in layers.items():
        device = next(modules[name].parameters()).device
        if info["factors"] == "int4":
            bias = tensors[f"{name}.bias"].to(device) if info["bias"] else None
            new[name] = LowRankInt4Linear(*(tensors[f"{name}.{k}"].to(device) for k in ("qdown", "sdown", "qup", "sup")),
                                          bias, info["rank"])
            continue
        key = info["down"]
        if key not in shared:
            shared[key] = nn.Parameter(tensors[f"{key}.down"].to(device))
        bias = tensors[f"{name}.bias"].to(device) if info["bias"] else None
        new[name] = LowRankLinear(tensors[f"{name}.up"].to(device), shared[key], bias)
    for name, layer in new.items():
        set_module(model, name, layer)
    return model
