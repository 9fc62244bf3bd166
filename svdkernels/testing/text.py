"""Built-in English text for calibration and evaluation, with no download: the
docstrings of a fixed selection of Python standard-library modules.

Calibration and held-out text come from disjoint modules (:data:`CALIB_MODULES`,
:data:`HELDOUT_MODULES`). The text is that of the running Python (3.11 here); a
different Python version changes it slightly, and so the numbers measured on it.
"""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from typing import Any

import torch

CALIB_MODULES = ("argparse", "collections", "datetime", "decimal", "functools", "itertools", "json",
                 "pathlib", "logging", "subprocess")
HELDOUT_MODULES = ("fractions", "textwrap", "string", "statistics", "heapq", "csv")


def stdlib_text(modules: Sequence[str]) -> str:
    """The module docstring and the docstrings of the public classes and functions
    (sorted by name) of each module, paragraphs joined by blank lines."""
    parts = []
    for mod_name in modules:
        mod = importlib.import_module(mod_name)
        parts.append(inspect.getdoc(mod) or "")
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or getattr(obj, "__module__", None) != mod_name:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                parts.append(inspect.getdoc(obj) or "")
    return "\n\n".join(p for p in parts if p)


def token_blocks(tokenizer: Any, text: str, *, block: int = 128, n_blocks: int | None = None
                 ) -> list[dict[str, torch.Tensor]]:
    """``text`` tokenised and cut into batches of one sequence of ``block`` tokens
    (``[CLS] … [SEP]``, no padding, so every token is real), at most ``n_blocks``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    step = block - 2
    out = []
    for i in range(0, len(ids) - step + 1, step):
        seq = [tokenizer.cls_token_id, *ids[i:i + step], tokenizer.sep_token_id]
        t = torch.tensor([seq])
        out.append({"input_ids": t, "attention_mask": torch.ones_like(t)})
        if n_blocks is not None and len(out) == n_blocks:
            break
    return out
