"""Where a transformer keeps its attention heads and layers: one small adapter per
model family, so that no analysis special-cases a family.

A :class:`Layout` maps a model to, per layer, references to its query, key, value
and output projections (:class:`LinearRef`: a module name, an out-feature slice
for fused projections, and whether the module stores ``[in, out]``), the head
counts and the head size. Supported:

- ``bert``: BERT-style encoders (``encoder.layer.{i}.attention.self.query``, ...;
  all-MiniLM-L6-v2, RoBERTa);
- ``llama``: Llama-style decoders (``layers.{i}.self_attn.q_proj``, ..., grouped
  KV heads; Mistral, Qwen2);
- ``gpt2``: GPT-2 (``h.{i}.attn.c_attn`` fused ``[d, 3d]`` ``Conv1D``, ``c_proj``).

Other models: pass module names explicitly (``modules=`` of
:func:`~svdkernels.analysis.gradient_spectra` and :func:`~svdkernels.analysis.spectra`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["LAYOUTS", "AttentionLayer", "Layout", "LinearRef", "detect_layout", "linear_modules", "weight_of"]

ROLES = ("q", "k", "v", "o")


@dataclass(frozen=True)
class LinearRef:
    """One projection: ``module`` (dotted name), ``rows`` (the slice of its output
    features that belongs to it, for fused QKV; all when ``None``), ``transposed``
    (``True`` for GPT-2's ``Conv1D``, which stores ``[in, out]``)."""

    module: str
    rows: Optional[tuple[int, int]] = None
    transposed: bool = False


@dataclass(frozen=True)
class AttentionLayer:
    """One attention block: ``refs`` maps ``q``, ``k``, ``v``, ``o`` to :class:`LinearRef`.

    Weights in ``[out, in]`` form: ``q`` ``[H·dh, d]``, ``k``/``v`` ``[H_kv·dh, d]``,
    ``o`` ``[d, H·dh]``.
    """

    index: int
    refs: dict[str, LinearRef]
    n_heads: int
    n_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Layout:
    """A model family's layout: ``name``, a regex ``pattern`` matching its query
    module names with the layer index as group 1, and how to build each layer."""

    name: str
    pattern: str
    example: str

    def layers(self, model: nn.Module) -> list[AttentionLayer]:
        """The model's attention layers, in order (``ValueError`` if none match)."""
        cfg = _config(model)
        names = dict(model.named_modules())
        found: dict[int, str] = {}
        for name in names:
            m = re.fullmatch(self.pattern, name)
            if m:
                found[int(m.group(2))] = m.group(1)
        if not found:
            raise ValueError(f"model: no module matches the {self.name} layout ({self.example})")
        out = []
        for i in sorted(found):
            out.append(_BUILDERS[self.name](found[i], i, cfg))
        for layer in out:
            for ref in layer.refs.values():
                if ref.module not in names:
                    raise ValueError(f"model: layout {self.name} expects module {ref.module!r}, which is missing")
        return out


def _config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError("model: expected a Hugging Face transformers model with a .config (head counts), "
                         f"got {type(model).__name__} without one")
    return cfg


def _heads(cfg: Any) -> tuple[int, int, int, int]:
    d = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")
    h = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head")
    h_kv = getattr(cfg, "num_key_value_heads", None) or h
    dh = getattr(cfg, "head_dim", None) or d // h
    return d, h, h_kv, dh


def _bert(prefix: str, i: int, cfg: Any) -> AttentionLayer:
    _, h, _, dh = _heads(cfg)
    p = f"{prefix}{i}.attention."
    refs = {"q": LinearRef(p + "self.query"), "k": LinearRef(p + "self.key"),
            "v": LinearRef(p + "self.value"), "o": LinearRef(p + "output.dense")}
    return AttentionLayer(i, refs, h, h, dh)


def _llama(prefix: str, i: int, cfg: Any) -> AttentionLayer:
    _, h, h_kv, dh = _heads(cfg)
    p = f"{prefix}{i}.self_attn."
    refs = {r: LinearRef(p + f"{r}_proj") for r in ROLES}
    return AttentionLayer(i, refs, h, h_kv, dh)


def _gpt2(prefix: str, i: int, cfg: Any) -> AttentionLayer:
    d, h, _, dh = _heads(cfg)
    p = f"{prefix}{i}.attn."
    refs = {"q": LinearRef(p + "c_attn", (0, d), True), "k": LinearRef(p + "c_attn", (d, 2 * d), True),
            "v": LinearRef(p + "c_attn", (2 * d, 3 * d), True), "o": LinearRef(p + "c_proj", None, True)}
    return AttentionLayer(i, refs, h, h, dh)


_BUILDERS = {"bert": _bert, "llama": _llama, "gpt2": _gpt2}

LAYOUTS: dict[str, Layout] = {
    "bert": Layout("bert", r"(.*layer\.)(\d+)\.attention\.self\.query", "encoder.layer.{i}.attention.self.query"),
    "llama": Layout("llama", r"(.*layers\.)(\d+)\.self_attn\.q_proj", "model.layers.{i}.self_attn.q_proj"),
    "gpt2": Layout("gpt2", r"(.*h\.)(\d+)\.attn\.c_attn", "transformer.h.{i}.attn.c_attn"),
}


def detect_layout(model: nn.Module, layout: Optional[str] = None) -> Layout:
    """The :class:`Layout` of ``model`` (``layout`` names it; detected by module names
    when ``None``). ``ValueError`` listing the supported layouts if none fits."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    supported = ", ".join(f"{k} ({v.example})" for k, v in LAYOUTS.items())
    if layout is not None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {sorted(LAYOUTS)}, got {layout!r}")
        return LAYOUTS[layout]
    names = [n for n, _ in model.named_modules()]
    for lay in LAYOUTS.values():
        if any(re.fullmatch(lay.pattern, n) for n in names):
            return lay
    raise ValueError(
        f"model: unrecognised layout for {type(model).__name__}; supported layouts: {supported}. "
        "For other models pass the linear modules explicitly, e.g. "
        "gradient_spectra(model, batches, modules=['blocks.0.attn.qkv', ...]) or spectra(model, modules=[...])")


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D ([in, out] weight), recognised without importing transformers.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def linear_modules(model: nn.Module, modules: Optional[list[str]] = None) -> dict[str, nn.Module]:
    """Linear modules by name: ``nn.Linear`` and GPT-2 ``Conv1D``. All of them when
    ``modules`` is ``None``; else exactly those named (``ValueError`` for a missing
    or non-linear one)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    named = dict(model.named_modules())
    if modules is None:
        return {n: m for n, m in named.items() if isinstance(m, nn.Linear) or _is_conv1d(m)}
    if isinstance(modules, str) or not all(isinstance(n, str) for n in modules):
        raise TypeError(f"modules: expected a list of module names, got {modules!r}")
    out = {}
    for n in modules:
        if n not in named:
            raise ValueError(f"modules: expected names of modules of the model, got {n!r}, which it does not have")
        m = named[n]
        if not (isinstance(m, nn.Linear) or _is_conv1d(m)):
            raise ValueError(f"modules: expected nn.Linear or Conv1D modules, got {n!r} of type {type(m).__name__}")
        out[n] = m
    if not out:
        raise ValueError("modules: expected at least one module name, got an empty list")
    return out


def weight_of(module: nn.Module, ref: Optional[LinearRef] = None) -> torch.Tensor:
    """The ``[out, in]`` weight of a linear module (the slice ``ref.rows`` of it for
    fused projections), detached. A view where possible: no copy."""
    w = module.weight.detach()
    if _is_conv1d(module):
        w = w.T
    if ref is not None and ref.rows is not None:
        w = w[ref.rows[0]:ref.rows[1]]
    return w
