"""Running calibration batches through a model (shared by the quantiser and the adapters).

A *batch* is whatever the model takes: a ``Mapping`` is passed as keyword
arguments (``model(**batch)``, e.g. a tokenizer's ``BatchEncoding``), a
``tuple``/``list`` as positional arguments, anything else as the single argument.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn


def run_batches(model: nn.Module, batches: Iterable[Any], name: str = "calib_batches") -> int:
    """Call ``model`` on every batch (module docstring), without gradients, in eval
    mode; return how many batches there were (``ValueError`` naming ``name`` if none,
    ``TypeError`` if ``batches`` is not iterable)."""
    if not isinstance(batches, Iterable) or isinstance(batches, (torch.Tensor, str, Mapping)):
        # A lone tensor or dict is one batch, not an iterable of batches: iterating
        # it would run the model on its rows (or keys) one by one.
        raise TypeError(f"{name}: expected an iterable of batches (e.g. a list), got {type(batches).__name__}")
    n = 0
    with torch.no_grad(), eval_mode(model):
        for batch in batches:
            if isinstance(batch, Mapping):
                model(**batch)
            elif isinstance(batch, (tuple, list)):
                model(*batch)
            else:
                model(batch)
            n += 1
    if n == 0:
        raise ValueError(f"{name}: expected at least one batch, got an empty iterable")
    return n


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module of ``model`` in eval mode (dropout off) inside the block; the
    training flags are restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training
