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
import os
import re
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from svdkernels.adapters.adapt import adapter_layers, residual_weight
from svdkernels.adapters.methods import METHODS
from svdkernels.adapters.modules import set_module
from svdkernels.adapters.svd_linear import SVDLinear

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


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuild the adapters saved by :func:`save_adapter` on ``model`` (the original,
    un-adapted model), in place; returns ``model``."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"path: expected a {FORMAT} file (safetensors metadata 'format'), "
                             f"got format {meta.get('format')!r}")
        if int(meta.get("version", -1)) > VERSION:
            raise ValueError(f"path: expected format version <= {VERSION}, got {meta.get('version')}")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name, info in json.loads(meta["layers"]).items():
        try:
            base = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"model: the adapter has layer {name!r}, which the model does not have") from e
        if type(base) is not nn.Linear or (base.out_features, base.in_features) != (
                info["out_features"], info["in_features"]):
            raise ValueError(f"model: expected {name!r} to be an nn.Linear {info['out_features']}x"
                             f"{info['in_features']}, got {base}")
        t = {k[len(name) + 1:]: v.to(base.weight.device) for k, v in tensors.items() if k.startswith(name + ".")
             and "." not in k[len(name) + 1:]}
        W0 = base.weight.detach()
        removed = (t["removed_up"], t["removed_down"]) if "removed_up" in t else None
        if not info["has_weight"]:
            weight = None
        elif removed is not None:
            weight = residual_weight(W0, *removed)
        else:
            weight = W0.clone()
        salt = {k: t[k] for k in ("sigma", "salt_scale", "salt_shift", "salt_U", "salt_Vh", "salt_X", "salt_Y")
                if k in t} or None
        layer = SVDLinear.from_parts(
            info["method"], weight=weight, bias=None if base.bias is None else base.bias.detach().clone(),
            A=t["lora_A"], B=t["lora_B"], scaling=info["scaling"], E=t.get("lora_E"), N=t.get("lora_N"),
            trainable=tuple(info["trainable"]), removed=removed, salt=salt, config=info["config"])
        layer.rank_mask.copy_(t["rank_mask"])
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
