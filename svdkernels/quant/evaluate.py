"""Evaluation of a quantised model against its float original: per-layer output SQNR
on real inputs (every layer fed the float model's activations, so errors do not
compound across layers). Calibration itself lives in :mod:`svdkernels.calibration`.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from svdkernels.calibration import output_hooks, run_batches

__all__ = ["layer_sqnr", "sqnr_db", "sqnr_hooks"]


def sqnr_db(signal_sq: float, noise_sq: float) -> float:
    """``10·log10(‖y‖²/‖y − ŷ‖²)`` from the two squared norms (``inf`` for no noise)."""
    if noise_sq == 0:
        return math.inf
    return 10 * math.log10(signal_sq / noise_sq) if signal_sq > 0 else -math.inf


@contextlib.contextmanager
def sqnr_hooks(reference: nn.Module, quantized: nn.Module) -> Iterator[dict[str, float]]:
    """Per-layer output SQNR (dB) of the quantised layers of ``quantized`` on the
    inputs their float counterparts in ``reference`` receive while the context is
    open: run ``reference`` inside it, as often as you like (e.g. to compute its own
    outputs too, so the float model runs once for both).

    Every :class:`~svdkernels.quant.linear.LowRankQuantLinear` of ``quantized`` is
    called on exactly the input the same-named layer of ``reference`` gets, so
    errors do not compound across layers; ``SQNR = 20·log10(‖y‖/‖y − ŷ‖)`` over all
    rows seen, ``y`` the float output.

    Yields:
        a dict, filled on exit with ``{name: dB}`` in module order (layers never
        called are left out).
    """
    from svdkernels.quant.linear import LowRankQuantLinear

    qlayers = {n: m for n, m in quantized.named_modules() if isinstance(m, LowRankQuantLinear)}
    if not qlayers:
        raise ValueError("quantized: expected a model with LowRankQuantLinear layers, got none")
    ref_modules = {n: reference.get_submodule(n) for n in qlayers}
    sums = {n: [0.0, 0.0] for n in qlayers}

    def hook(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        y = y.float()
        err = qlayers[name](x).float() - y
        sums[name][0] += float(y.square().sum())
        sums[name][1] += float(err.square().sum())

    result: dict[str, float] = {}
    with output_hooks(ref_modules, hook):
        yield result
    result.update({n: sqnr_db(s, e) for n, (s, e) in sums.items() if s > 0 or e > 0})


def layer_sqnr(reference: nn.Module, quantized: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
    """Per-layer output SQNR (dB) of the quantised layers of ``quantized`` on the
    real inputs of the same layers in ``reference`` (its float original), during a
    forward of ``reference`` on ``batches`` (see :func:`sqnr_hooks`).

    Returns:
        ``{name: dB}``, in module order (layers never called are left out).
    """
    with sqnr_hooks(reference, quantized) as db:
        run_batches(reference, batches, name="batches")
    return db
