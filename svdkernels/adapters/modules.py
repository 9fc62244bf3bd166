"""Finding and replacing the sub-modules an adapter wraps (shared by every adapter)."""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Optional, Union

from torch import nn

Targets = Optional[Union[str, Sequence[str]]]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the sub-module called ``name`` (dotted path) of ``model`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def matches(name: str, targets: Targets) -> bool:
    """peft's ``target_modules`` rule: a string is a regex that must match the whole
    name; a list names modules by their full name or a dotted suffix (``"query"``
    matches ``encoder.layer.0.attention.self.query``); ``None`` matches everything."""
    if targets is None:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_linears(model: nn.Module, targets: Targets) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` sub-modules of ``model`` that ``targets`` selects, by name.

    Raises ``TypeError`` for a malformed ``targets`` and ``ValueError`` when nothing
    matches (listing a few of the linear layers there are)."""
    if targets is not None and not isinstance(targets, str):
        if not isinstance(targets, Sequence) or not all(isinstance(t, str) for t in targets):
            raise TypeError(f"targets: expected None, a regex string or a list of module names, got {targets!r}")
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    found = {n: m for n, m in linears.items() if matches(n, targets)}
    if not found:
        some = ", ".join(list(linears)[:6]) or "none"
        raise ValueError(f"targets: expected names matching nn.Linear layers of the model, got {targets!r} "
                         f"which matches none (linear layers: {some}{', ...' if len(linears) > 6 else ''})")
    return found


def saved_base_linear(model: nn.Module, name: str, info: dict[str, Any]) -> nn.Linear:
    """The ``nn.Linear`` named ``name`` in ``model``, checked against the saved layer's
    ``out_features``/``in_features`` (a ``ValueError`` naming ``model`` otherwise)."""
    try:
        base = model.get_submodule(name)
    except AttributeError as e:
        raise ValueError(f"model: the file has layer {name!r}, which the model does not have") from e
    if type(base) is not nn.Linear or (base.out_features, base.in_features) != (
            info["out_features"], info["in_features"]):
        raise ValueError(f"model: expected {name!r} to be an nn.Linear {info['out_features']}x"
                         f"{info['in_features']}, got {base}")
    return base
