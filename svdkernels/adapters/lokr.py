"""peft LoKr adapters in and out of :class:`~svdkernels.adapters.kron.KronLinear`.

A peft LoKr adapter directory holds ``adapter_config.json`` (``peft_type`` "LOKR",
``r``, ``alpha``, ``rank_pattern``, ``alpha_pattern``, ``decompose_both``,
``decompose_factor``, ...) and ``adapter_model.safetensors`` with, per adapted
``nn.Linear`` named ``<name>``, the tensors
``base_model.model.<name>.lokr_w1`` (or ``lokr_w1_a``/``lokr_w1_b``) and
``base_model.model.<name>.lokr_w2`` (or ``lokr_w2_a``/``lokr_w2_b``). The delta is
``kron(w1, w2)·alpha/r`` (peft ``LoKrLayer.get_delta_weight``), which is
:class:`KronLinear` with ``A = w1`` and ``B = w2`` (one Kronecker term).

:func:`load_lokr` wraps the named layers of a plain model; :func:`save_lokr` writes
the same format back, choosing per layer the ``r`` that makes peft rebuild the
same parametrisation (dense or low-rank factors) and the ``alpha`` that gives the
same scale. Only safetensors and JSON are read or written.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from svdkernels.adapters.kron import KronLinear, near_square_factors
from svdkernels.adapters.modules import set_module
from svdkernels.errors import FormatError

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<name>.+)\.lokr_(?P<part>w1|w1_a|w1_b|w2|w2_a|w2_b|t2)$")


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    # peft's get_pattern_key: a key matches a module name as a dotted suffix regex.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_config(path: str, config_path: str) -> dict[str, Any]:
    """``adapter_config.json``, checked for the keys :func:`load_lokr` uses."""
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(path, f"{CONFIG_NAME} is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise FormatError(path, f"{CONFIG_NAME}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LOKR":
        raise FormatError(path, f"{CONFIG_NAME}: expected a LoKr adapter (peft_type 'LOKR'), "
                                f"got {config.get('peft_type')!r}")
    if config.get("use_effective_conv2d", False) not in (False, None):
        raise FormatError(path, f"{CONFIG_NAME}: use_effective_conv2d = {config['use_effective_conv2d']!r}; only "
                                "nn.Linear LoKr layers are supported")

    def rank(where: str, v: object) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise FormatError(path, f"{CONFIG_NAME}: expected {where} a positive int, got {v!r}")

    def alpha(where: str, v: object) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise FormatError(path, f"{CONFIG_NAME}: expected {where} a positive finite number, got {v!r}")

    rank("r", config.get("r", 8))
    alpha("alpha", config.get("alpha", 8))
    for key, check in (("rank_pattern", rank), ("alpha_pattern", alpha)):
        pat = config.get(key, {})  # absent in old peft configs; null is not a pattern table
        if not isinstance(pat, dict):
            raise FormatError(path, f"{CONFIG_NAME}: expected {key} a JSON object, got {type(pat).__name__}")
        for k, v in pat.items():
            try:
                re.compile(k)
            except re.error as e:
                raise FormatError(path, f"{CONFIG_NAME}: {key} key {k!r} is not a valid regex ({e})") from None
            check(f"{key}[{k!r}]", v)
    if not isinstance(config.get("decompose_both", False), bool):
        raise FormatError(path, f"{CONFIG_NAME}: expected decompose_both a bool, got {config['decompose_both']!r}")
    factor = config.get("decompose_factor", -1)
    if isinstance(factor, bool) or not isinstance(factor, int) or not (factor == -1 or factor > 0):
        raise FormatError(path, f"{CONFIG_NAME}: expected decompose_factor -1 or a positive int, got {factor!r}")
    return config


def _lokr_factor(path: str, name: str, parts: dict[str, torch.Tensor], which: str, shape: tuple[int, int],
                 r: int, low_rank: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LoKr's ``w1``/``w2`` of module ``name``, checked against peft's layout: dense
    ``[p, q]`` or, when peft would build it low-rank, ``_a [p, r]`` and ``_b [r, q]``."""
    present = sorted(k for k in parts if k.startswith(which))
    want = [f"{which}_a", f"{which}_b"] if low_rank else [which]
    if present != want:
        raise FormatError(path, f"module {name!r}: expected tensors {['lokr_' + w for w in want]} (peft's layout "
                                f"for r = {r}), got {['lokr_' + w for w in present]}")
    p, q = shape
    shapes = {f"{which}_a": (p, r), f"{which}_b": (r, q)} if low_rank else {which: (p, q)}
    for key, want_shape in shapes.items():
        t = parts[key]
        if tuple(t.shape) != want_shape:
            raise FormatError(path, f"tensor '{PREFIX}{name}.lokr_{key}': expected shape {list(want_shape)}, "
                                    f"got {list(t.shape)}")
        if not t.is_floating_point():
            raise FormatError(path, f"tensor '{PREFIX}{name}.lokr_{key}': expected a floating-point dtype, "
                                    f"got {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise FormatError(path, f"tensor '{PREFIX}{name}.lokr_{key}': expected finite values, got NaN or inf")
    return parts[which] if not low_rank else (parts[f"{which}_a"], parts[f"{which}_b"])


def load_lokr(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Wrap the layers a peft LoKr adapter names in :class:`KronLinear`, in place.

    Args:
        model: the plain base model (no peft wrapper) the adapter was trained on.
        path: the adapter directory written by peft's ``save_pretrained``.

    Returns:
        ``model`` (for a bare ``nn.Linear``, the ``KronLinear`` that replaces it),
        whose adapted ``nn.Linear`` layers are now ``KronLinear`` with the
        adapter's factors and scale ``alpha / r``; its outputs equal peft's
        ``PeftModel.from_pretrained(model, path)`` (dropouts are training-only and
        not applied).

    The whole adapter is checked before the model is changed: the config's types
    and ranges (``r``, ``alpha``, the patterns as regexes), the tensor names, each
    factor's shape against peft's split of the layer (``decompose_factor``) and the
    dense or low-rank layout peft builds for its ``r``, finiteness.

    Raises:
        svdkernels.errors.FormatError (a ``ValueError``): a missing file, malformed
            JSON or safetensors, or an adapter peft would not load the same way.
        ValueError/TypeError: ``model`` lacks a named module or it is not an ``nn.Linear``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    path = os.fspath(path)
    config_path, weights_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    for p in (config_path, weights_path):
        if not os.path.isfile(p):
            raise FormatError(path, f"expected a peft adapter directory with {CONFIG_NAME} and {WEIGHTS_NAME}, "
                                    f"missing {p}")
    config = _read_config(path, config_path)
    try:
        tensors = load_file(weights_path)
    except Exception as e:  # SafetensorError, OSError, ...
        raise FormatError(path, f"{WEIGHTS_NAME} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise FormatError(path, f"unexpected tensor {key!r} in {WEIGHTS_NAME} (expected <module>.lokr_w1 etc.)")
        if m["part"] == "t2":
            raise FormatError(path, f"{key!r} is an effective-conv2d (Tucker) factor; only nn.Linear LoKr "
                                    "layers are supported")
        layers.setdefault(m["name"], {})[m["part"]] = value
    if not layers:
        raise FormatError(path, f"{WEIGHTS_NAME} holds no LoKr tensors")
    r0, alpha0 = config.get("r", 8), config.get("alpha", 8)
    factor = config.get("decompose_factor", -1)
    decompose_both = config.get("decompose_both", False)
    plan = {}
    for name, parts in layers.items():
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"model: the adapter names module {name!r}, which the model does not have") from None
        if not isinstance(base, nn.Linear) or isinstance(base, KronLinear):
            raise TypeError(f"model: module {name!r} is a {type(base).__name__}; only nn.Linear is supported")
        r = _pattern_value(config.get("rank_pattern", {}), name, r0)
        alpha = _pattern_value(config.get("alpha_pattern", {}), name, alpha0)
        (out_l, out_k), (in_m, in_n) = (near_square_factors(base.out_features, factor),
                                        near_square_factors(base.in_features, factor))
        # peft.tuners.lokr.layer.LoKrLayer.update_layer: which factors are low-rank.
        low1 = decompose_both and r < max(out_l, in_m) / 2
        low2 = r < max(out_k, in_n) / 2
        w1 = _lokr_factor(path, name, parts, "w1", (out_l, in_m), r, low1)
        w2 = _lokr_factor(path, name, parts, "w2", (out_k, in_n), r, low2)
        plan[name] = (base, w1, w2, alpha / r)
    built = {}
    dtype_of = lambda f, d: f.to(d) if isinstance(f, torch.Tensor) else tuple(t.to(d) for t in f)  # noqa: E731
    for name, (base, w1, w2, scale) in plan.items():
        dtype = base.weight.dtype
        layer = KronLinear.from_factors(base, dtype_of(w1, dtype), dtype_of(w2, dtype), scale=scale)
        built[name] = layer.to(base.weight.device)
    for name, layer in built.items():  # the model changes only once the whole adapter is checked
        if name == "":
            return layer
        set_module(model, name, layer)
    return model


def _lokr_rank(name: str, layer: KronLinear, decompose_both: bool, factor: int) -> int:
    """The ``r`` under which peft rebuilds this layer's exact parametrisation."""
    if layer.num_terms != 1:
        raise ValueError(f"model: layer {name!r} has {layer.num_terms} Kronecker terms; peft LoKr holds one")
    out_f, in_f = layer.base.out_features, layer.base.in_features
    (out_l, out_k), (in_m, in_n) = near_square_factors(out_f, factor), near_square_factors(in_f, factor)
    if layer.a_shape != (out_l, in_m) or layer.b_shape != (out_k, in_n):
        raise ValueError(f"model: layer {name!r} has factor shapes {layer.a_shape}, {layer.b_shape}; peft LoKr "
                         f"with decompose_factor={factor} uses {(out_l, in_m)}, {(out_k, in_n)}")
    A, B = layer.factor("A"), layer.factor("B")
    ranks = {f[0].shape[-1] for f in (A, B) if not isinstance(f, torch.Tensor)}
    if len(ranks) > 1:
        raise ValueError(f"model: layer {name!r} has low-rank factors of different ranks {sorted(ranks)}; "
                         "peft LoKr uses one r for both")
    # Dense factors need r >= max(dims)/2; any r that large will do.
    r = ranks.pop() if ranks else max(out_l, in_m, out_k, in_n)
    use_w1 = not (decompose_both and r < max(out_l, in_m) / 2)
    use_w2 = not (r < max(out_k, in_n) / 2)
    if use_w1 != isinstance(A, torch.Tensor) or use_w2 != isinstance(B, torch.Tensor):
        raise ValueError(f"model: layer {name!r} cannot be expressed in peft LoKr: with r={r} peft would build "
                         f"w1 {'dense' if use_w1 else 'low-rank'} and w2 {'dense' if use_w2 else 'low-rank'}")
    return r


def save_lokr(
    model: nn.Module, path: str | os.PathLike, *, decompose_factor: int = -1,
    base_model_name_or_path: str | None = None,
) -> None:
    """Write the model's :class:`KronLinear` layers as a peft LoKr adapter directory.

    ``PeftModel.from_pretrained(base_model, path)`` then reproduces this model's
    outputs. Each layer gets its own ``r`` and ``alpha`` (in ``rank_pattern`` and
    ``alpha_pattern``) so that peft rebuilds dense or low-rank factors exactly as
    they are here and ``alpha / r`` equals the layer's scale. ``decompose_factor``
    is peft's (the one the adapter was created with; -1 is the near-square split
    :class:`KronLinear` uses by default). Raises ``ValueError``
    for layers LoKr cannot express (several Kronecker terms, factor shapes other
    than peft's split, merged layers).
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, KronLinear)}
    if not layers:
        raise ValueError("model: expected at least one KronLinear layer, found none")
    factor = decompose_factor
    decompose_both = any(not isinstance(m.factor("A"), torch.Tensor) for m in layers.values())
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"model: layer {name!r} is merged; unmerge() it before saving the adapter")
        r = _lokr_rank(name, layer, decompose_both, factor)
        anchored = "^" + re.escape(name)  # matches this module only (peft appends "$")
        rank_pattern[anchored] = r
        alpha_pattern[anchored] = layer.scale * r
        for which, f in (("w1", layer.factor("A")), ("w2", layer.factor("B"))):
            if isinstance(f, torch.Tensor):
                tensors[f"{PREFIX}{name}.lokr_{which}"] = f.detach()[0].contiguous().cpu()
            else:
                tensors[f"{PREFIX}{name}.lokr_{which}_a"] = f[0].detach()[0].contiguous().cpu()
                tensors[f"{PREFIX}{name}.lokr_{which}_b"] = f[1].detach()[0].contiguous().cpu()
    config = {
        "peft_type": "LOKR",
        "base_model_name_or_path": base_model_name_or_path,
        "target_modules": sorted(layers),
        "r": 8,
        "alpha": 8,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "decompose_both": decompose_both,
        "decompose_factor": factor,
        "rank_dropout": 0.0,
        "module_dropout": 0.0,
        "rank_dropout_scale": False,
        "init_weights": True,
        "use_effective_conv2d": False,
        "inference_mode": True,
        "task_type": None,
    }
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
