"""Saving SVD adapters with safetensors and exporting them to peft's LoRA format.

:func:`save_adapter` writes every :class:`SVDLinear`'s own tensors (not the
frozen base weight) plus JSON metadata; :func:`load_adapter` rebuilds the layers on
the *original* model, recomputing each residual from the original weight exactly as
:func:`svdkernels.adapt` did, so outputs are bit-identical. Nothing is pickled.

:func:`export_peft_lora` writes an adapter directory that
``peft.PeftModel.from_pretrained(original_model, path)`` loads as a LoRA with the
same outputs. Residual methods (PiSSA, MiLoRA, CorDA) are converted the way peft
documents for PiSSA: the frozen residual is ``W₀ − up·down``, so the LoRA on ``W₀``
is ``s·B·A − up·down = s·[B, −up/s]·[A; down]`` of rank ``2r``.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from svdkernels.adapters.adapt import adapter_layers, residual_weight
from svdkernels.adapters.methods import METHODS
from svdkernels.adapters.modules import saved_base_linear, set_module
from svdkernels.adapters.svd_linear import SALT_PARTS, SVDLinear
from svdkernels.errors import FormatError

FORMAT = "svdkernels.svd_adapter"
VERSION = 1
PEFT_PREFIX = "base_model.model."


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write every :class:`SVDLinear` of ``model`` to the safetensors file ``path``.

    Tensors ``<layer>.<name>`` for all of the layer's parameters and buffers except
    the base ``weight`` and ``bias`` (rebuilt from the original model on load);
    metadata ``format``, ``version`` and ``layers`` (JSON: per layer its method,
    shape, scaling, config, trainable names, whether it has a base weight and merged
    state). Merged layers are saved unmerged-equivalent: the branch tensors are the
    same either way.
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model: expected layers adapted by svdkernels.adapt, found none")
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"model: layer {name!r} is merged; unmerge() it before saving the adapter")
        for key, t in [*layer.named_parameters(recurse=False), *layer.named_buffers(recurse=False)]:
            if key not in ("weight", "bias"):
                tensors[f"{name}.{key}"] = t.detach().contiguous().cpu()
        meta[name] = {"method": layer.method, "in_features": layer.in_features, "out_features": layer.out_features,
                      "scaling": layer.scaling, "config": layer.config, "trainable": layer.trainable_names(),
                      "has_weight": layer.weight is not None}
    save_file(tensors, str(path), metadata={"format": FORMAT, "version": str(VERSION), "layers": json.dumps(meta)})


_LAYER_KEYS = frozenset({"method", "in_features", "out_features", "scaling", "config", "trainable", "has_weight"})
"""The keys of each layer's entry in the ``layers`` metadata (all required)."""

_CONFIG_KEYS = {"sorsa": {"gamma"}, "effort": {"weight_orth"}, "salt": {"reg_weight"}, "kasa": {"beta", "gamma"},
                "adalora": {"orth_reg_weight"}}
"""Per method, the keys of its ``config`` (the regulariser weights); others have none."""

_WITH_E = frozenset({"svfit", "clip_svd", "sorsa", "effort", "kasa", "adalora"})
_RESIDUAL = frozenset({"pissa", "milora", "soma", "svfit", "sorsa", "salt", "kasa", "corda", "nlora", "effort"})


def expected_tensors(method: str) -> set[str]:
    """The tensor names (after ``<layer>.``) that :func:`save_adapter` writes for a
    layer of ``method``: the file schema :func:`load_adapter` checks."""
    names = {"lora_A", "lora_B", "rank_mask"}
    if method in _WITH_E:
        names.add("lora_E")
    if method == "nlora":
        names.add("lora_N")
    if method in _RESIDUAL:
        names |= {"removed_up", "removed_down"}
    if method == "salt":
        names |= set(SALT_PARTS)
    return names


def _read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """The checked ``layers`` metadata and the tensors grouped by layer, of a file
    written by :func:`save_adapter`; :class:`FormatError` for anything else."""
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:  # SafetensorError, OSError, ...: the file is not safetensors
        raise FormatError(path, f"not a readable safetensors file ({type(e).__name__}: {e})") from e
    if meta.get("format") != FORMAT:
        raise FormatError(path, f"expected metadata format = {FORMAT!r} (a file written by save_adapter), "
                                f"got {meta.get('format')!r}")
    if meta.get("version") != str(VERSION):
        raise FormatError(path, f"expected metadata version = '{VERSION}', got {meta.get('version')!r}")
    extra = set(meta) - {"format", "version", "layers"}
    if extra:
        raise FormatError(path, f"unexpected metadata keys {sorted(extra)} (expected format, version, layers)")
    try:
        layers = json.loads(meta["layers"])
    except KeyError:
        raise FormatError(path, "missing metadata key 'layers'") from None
    except ValueError as e:
        raise FormatError(path, f"metadata 'layers' is not valid JSON ({e})") from e
    if not isinstance(layers, dict) or not layers:
        raise FormatError(path, f"expected metadata 'layers' to be a non-empty JSON object, got {meta['layers'][:80]!r}")
    by_layer: dict[str, dict[str, torch.Tensor]] = {name: {} for name in layers}
    for key, t in tensors.items():
        name, _, part = key.rpartition(".")
        if name not in by_layer:
            raise FormatError(path, f"unexpected tensor {key!r}: it belongs to no layer of the metadata")
        by_layer[name][part] = t
    for name, info in layers.items():
        _check_layer_info(path, name, info)
        want, got = expected_tensors(info["method"]), set(by_layer[name])
        if want != got:
            missing, unexpected = sorted(want - got), sorted(got - want)
            raise FormatError(path, f"layer {name!r} ({info['method']}): expected tensors {sorted(want)}, "
                                    f"missing {missing}, unexpected {unexpected}")
    return layers, by_layer


def _check_layer_info(path: str | os.PathLike, name: str, info: object) -> None:
    where = f"layer {name!r}"
    if not isinstance(info, dict) or set(info) != _LAYER_KEYS:
        got = sorted(info) if isinstance(info, dict) else type(info).__name__
        raise FormatError(path, f"{where}: expected metadata keys {sorted(_LAYER_KEYS)}, got {got}")
    method = info["method"]
    if not isinstance(method, str) or method not in METHODS:
        raise FormatError(path, f"{where}: expected method one of {tuple(METHODS)}, got {method!r}")
    for key in ("in_features", "out_features"):
        v = info[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise FormatError(path, f"{where}: expected {key} a positive int, got {v!r}")
    s = info["scaling"]
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
        raise FormatError(path, f"{where}: expected scaling a positive finite number, got {s!r}")
    config = info["config"]
    want = _CONFIG_KEYS.get(method, set())
    if not isinstance(config, dict) or set(config) != want:
        got = sorted(config) if isinstance(config, dict) else type(config).__name__
        raise FormatError(path, f"{where}: expected config keys {sorted(want)} for method {method!r}, got {got}")
    for k, v in config.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise FormatError(path, f"{where}: expected config[{k!r}] a finite number >= 0, got {v!r}")
    tr = info["trainable"]
    if not isinstance(tr, list) or not all(isinstance(n, str) for n in tr) or len(set(tr)) != len(tr):
        raise FormatError(path, f"{where}: expected trainable a list of distinct parameter names, got {tr!r}")
    params = expected_tensors(method) - {"rank_mask", "removed_up", "removed_down", "sigma"}
    if not set(tr) <= params:
        raise FormatError(path, f"{where}: expected trainable names among the adapter's parameters "
                                f"{sorted(params)} for method {method!r}, got {tr!r}")
    if info["has_weight"] is not (method != "clip_svd"):
        raise FormatError(path, f"{where}: expected has_weight = {str(method != 'clip_svd').lower()} for method "
                                f"{method!r}, got {info['has_weight']!r}")


def _check_layer_tensors(path: str | os.PathLike, name: str, info: dict[str, Any], t: dict[str, torch.Tensor],
                         dtype: torch.dtype) -> None:
    """Shapes, dtypes and finiteness of one layer's tensors against its metadata and
    the model's weight dtype."""
    out_f, in_f = info["out_features"], info["in_features"]
    where = f"layer {name!r}"
    r = t["lora_A"].shape[0] if t["lora_A"].dim() == 2 else -1
    k = min(out_f, in_f)
    shapes: dict[str, tuple[int, ...]] = {"lora_A": (r, in_f), "lora_B": (out_f, r), "rank_mask": (r,),
                                          "lora_E": (r,), "lora_N": (r, r)}
    if "removed_up" in t:
        p = t["removed_up"].shape[-1] if t["removed_up"].dim() == 2 else -1
        shapes.update(removed_up=(out_f, p), removed_down=(p, in_f))
    if "salt_X" in t:
        q = t["salt_X"].shape[-1] if t["salt_X"].dim() == 2 else -1
        shapes.update(sigma=(r,), salt_scale=(r,), salt_shift=(r,), salt_U=(out_f, k - r), salt_Vh=(k - r, in_f),
                      salt_X=(k - r, q), salt_Y=(q, k - r))
    if not 1 <= r <= k:
        raise FormatError(path, f"{where}: expected lora_A [r, in_features] with 1 <= r <= {k}, "
                                f"got {list(t['lora_A'].shape)}")
    for part, tensor in t.items():
        want = shapes[part]
        if tuple(tensor.shape) != want or min(want) < 0:
            raise FormatError(path, f"tensor '{name}.{part}': expected shape {list(want)} (r = {r}, "
                                    f"in_features = {in_f}, out_features = {out_f}), got {list(tensor.shape)}")
        want_dtype = torch.bool if part == "rank_mask" else torch.float32 if part.startswith("removed_") else dtype
        if tensor.dtype != want_dtype:
            raise FormatError(path, f"tensor '{name}.{part}': expected dtype {want_dtype} (the model's weight "
                                    f"dtype is {dtype}), got {tensor.dtype}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise FormatError(path, f"tensor '{name}.{part}': expected finite values, got NaN or inf")
    if info["method"] != "adalora" and not bool(t["rank_mask"].all()):
        raise FormatError(path, f"tensor '{name}.rank_mask': expected all True for method {info['method']!r} "
                                "(only AdaLoRA masks components)")


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuild the adapters saved by :func:`save_adapter` on ``model`` (the original,
    un-adapted model), in place; returns ``model`` (for a bare ``nn.Linear``, the
    adapter layer that replaces it).

    The whole file is checked before the model is changed: the format and version,
    the exact set of tensor names each layer's method implies, every tensor's shape
    against the metadata and the model and its dtype against the model's weight,
    finiteness, and the metadata's keys, types and ranges.

    Raises:
        FileNotFoundError: no such file.
        svdkernels.errors.FormatError (a ``ValueError``): the file is not a valid
            adapter file (it names the file and what is wrong).
        ValueError: ``model`` lacks a layer the file adapts, or it is not an
            ``nn.Linear`` of the saved shape.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    layers, by_layer = _read_adapter(path)
    built: dict[str, SVDLinear] = {}
    for name, info in layers.items():
        base = saved_base_linear(model, name, info)
        _check_layer_tensors(path, name, info, by_layer[name], base.weight.dtype)
        t = {k: v.to(base.weight.device) for k, v in by_layer[name].items()}
        W0 = base.weight.detach()
        removed = (t["removed_up"], t["removed_down"]) if "removed_up" in t else None
        if not info["has_weight"]:
            weight = None
        elif removed is not None:
            weight = residual_weight(W0, *removed)
        else:
            weight = W0.clone()
        salt = {k: t[k] for k in SALT_PARTS if k in t} or None
        try:
            layer = SVDLinear.from_parts(
                info["method"], weight=weight, bias=None if base.bias is None else base.bias.detach().clone(),
                A=t["lora_A"], B=t["lora_B"], scaling=info["scaling"], E=t.get("lora_E"), N=t.get("lora_N"),
                trainable=tuple(info["trainable"]), removed=removed, salt=salt, config=info["config"])
        except (TypeError, ValueError) as e:
            raise FormatError(path, f"layer {name!r}: {e}") from e
        layer.rank_mask.copy_(t["rank_mask"])
        built[name] = layer
    for name, layer in built.items():  # the model changes only once the whole file is checked
        if name == "":
            return layer
        set_module(model, name, layer)
    return model


def export_peft_lora(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model``'s adapters as a peft LoRA directory (``adapter_config.json`` +
    ``adapter_model.safetensors``) for ``PeftModel.from_pretrained(original, path)``.

    Only methods whose branch is a plain ``s·B·A`` (lora, pissa, milora, corda, eva)
    can be expressed as a LoRA; others raise ``ValueError``. Per-layer ranks and
    scalings go to ``rank_pattern`` / ``alpha_pattern`` (``alpha = scaling·r``).
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model: expected layers adapted by svdkernels.adapt, found none")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for name, layer in layers.items():
        if not METHODS[layer.method].peft_lora:
            raise ValueError(f"model: layer {name!r} uses {layer.method!r}, which peft's LoRA cannot express "
                             f"(exportable: {[m for m, s in METHODS.items() if s.peft_lora]})")
        if layer.merged:
            raise ValueError(f"model: layer {name!r} is merged; unmerge() it before exporting")
        A, B, s = layer.lora_A.detach().float(), layer.lora_B.detach().float(), layer.scaling
        if hasattr(layer, "removed_up"):
            A = torch.cat([A, layer.removed_down.float()])
            B = torch.cat([B, -layer.removed_up.float() / s], dim=1)
        dtype = layer.lora_A.dtype
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.to(dtype).contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.to(dtype).contiguous().cpu()
        ranks[name], alphas[name] = A.shape[0], s * A.shape[0]
    r0 = next(iter(ranks.values()))
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
        "r": r0, "lora_alpha": alphas[next(iter(alphas))], "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(layers), "fan_in_fan_out": False, "use_rslora": False, "modules_to_save": None,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
        # peft matches these keys as regexes against module-name suffixes: escape the dots.
        "rank_pattern": {re.escape(n): r for n, r in ranks.items()},
        "alpha_pattern": {re.escape(n): a for n, a in alphas.items()},
    }
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
