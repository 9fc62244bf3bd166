"""Calibration for SVDQuant (Li et al. 2024): what the inputs of a model's linear
layers look like on real data, gathered with forward hooks.

- :func:`collect_input_stats`: per layer, the per-channel max, min, sum and sum
  of squares of its inputs (SVDQuant's smoothing factors need ``max|X_j|``, or
  the RMS; the unsigned-int4 decision needs the minimum) and a bounded uniform
  sample of input rows (for the grid search of the smoothing exponent on output
  error).
- :func:`layer_sqnr`: the per-layer output SQNR of a quantised model on the real
  inputs of its float original (every layer fed the float model's activations,
  so errors do not compound across layers).

Hooks are always removed, also when a batch raises; modules run in eval mode
(dropout off) during calibration and get their training flags back afterwards.

A *batch* is whatever the model takes (:func:`svdkernels.batches.run_batches`): a
``Mapping`` is passed as keyword arguments (``model(**batch)``, e.g. a tokenizer's
output), a ``tuple``/``list`` as positional arguments, anything else as the single
argument.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from svdkernels.batches import run_batches

DEFAULT_MAX_ROWS = 512
"""Input rows kept per layer for the smoothing search."""

__all__ = ["DEFAULT_MAX_ROWS", "InputStats", "collect_input_stats", "layer_sqnr", "run_batches", "sqnr_db"]

Hook = Callable[[str, torch.Tensor, torch.Tensor], None]


def sqnr_db(signal_sq: float, noise_sq: float) -> float:
    """``10·log10(‖y‖²/‖y − ŷ‖²)`` from the two squared norms (``inf`` for no noise)."""
    if noise_sq == 0:
        return math.inf
    return 10 * math.log10(signal_sq / noise_sq) if signal_sq > 0 else -math.inf


@contextlib.contextmanager
def output_hooks(modules: Mapping[str, nn.Module], fn: Hook) -> Iterator[None]:
    """Call ``fn(name, x, y)`` after every forward of ``modules[name]`` (``x`` its
    input, ``y`` its output) while the context is open; the hooks are removed on
    exit, also on an exception."""
    handles = []

    def make(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
            fn(name, args[0] if args else kwargs["input"], out)

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make(name), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class InputStats:
    """What one linear layer saw during calibration (``K`` = its in_features).

    ``channel_max``/``channel_min`` ``[K]`` float32 and ``channel_sum``/
    ``channel_sumsq`` ``[K]`` float64 over every input row; ``rows`` ``[m, K]``
    float32, a uniform sample without replacement of ``m = min(n_rows, max_rows)``
    input rows; ``n_rows`` the number of rows seen.
    """

    channel_max: torch.Tensor
    channel_min: torch.Tensor
    channel_sum: torch.Tensor
    channel_sumsq: torch.Tensor
    rows: torch.Tensor
    n_rows: int

    @property
    def absmax(self) -> torch.Tensor:
        """``max_i |X_ij|`` per channel, ``[K]``."""
        return torch.maximum(self.channel_max.abs(), self.channel_min.abs())

    def rms(self, shift: float = 0.0) -> torch.Tensor:
        """``sqrt(mean_i (X_ij + shift)²)`` per channel, ``[K]`` float32."""
        n = self.n_rows
        ms = (self.channel_sumsq + 2 * shift * self.channel_sum) / n + shift * shift
        return ms.clamp(min=0).sqrt().float()

    @property
    def min(self) -> float:
        """The smallest input value seen."""
        return float(self.channel_min.min())


class _Sampler:
    """Running max/min/sum/sum of squares and a bounded uniform row sample (priority sampling: every
    row gets a random key, the ``max_rows`` smallest keys are kept), deterministic
    for a given seed and batch order."""

    def __init__(self, max_rows: int, seed: int) -> None:
        self.max_rows = max_rows
        self.gen = torch.Generator().manual_seed(seed)
        self.rows: torch.Tensor | None = None
        self.keys = torch.empty(0)
        self.cmax: torch.Tensor | None = None
        self.cmin: torch.Tensor | None = None
        self.csum: torch.Tensor | float = 0.0
        self.csumsq: torch.Tensor | float = 0.0
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if x.shape[0] == 0:
            return
        bmax, bmin = x.amax(0), x.amin(0)
        self.cmax = bmax if self.cmax is None else torch.maximum(self.cmax, bmax)
        self.cmin = bmin if self.cmin is None else torch.minimum(self.cmin, bmin)
        x64 = x.double()
        self.csum = self.csum + x64.sum(0)
        self.csumsq = self.csumsq + x64.square().sum(0)
        self.n += x.shape[0]
        keys = torch.rand(x.shape[0], generator=self.gen)
        rows = x if self.rows is None else torch.cat([self.rows, x])
        keys = torch.cat([self.keys, keys])
        if keys.numel() > self.max_rows:
            keep = keys.topk(self.max_rows, largest=False).indices.sort().values
            rows, keys = rows[keep.to(rows.device)], keys[keep]
        self.rows, self.keys = rows, keys

    def stats(self) -> InputStats | None:
        if self.n == 0:
            return None
        return InputStats(self.cmax, self.cmin, self.csum, self.csumsq, self.rows, self.n)


def collect_input_stats(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    calib_batches: Iterable[Any],
    *,
    max_rows: int = DEFAULT_MAX_ROWS,
    seed: int = 0,
) -> dict[str, InputStats]:
    """Run ``model`` on ``calib_batches`` and gather the inputs of ``modules``.

    Args:
        model: the float model.
        modules: the layers to watch, by name (submodules of ``model``).
        calib_batches: an iterable of batches (module docstring), consumed once.
        max_rows: rows sampled per layer (tokens; all leading dims are flattened).
        seed: seed of the row sampling.

    Returns:
        ``{name: InputStats}`` for every module that was called at least once.

    Raises:
        ValueError: ``calib_batches`` is empty, ``max_rows < 1``.
    """
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows: expected a positive int, got {max_rows!r}")
    samplers = {name: _Sampler(max_rows, seed) for name in modules}
    with output_hooks(modules, lambda name, x, y: samplers[name].add(x)):
        run_batches(model, calib_batches)
    return {name: st for name, s in samplers.items() if (st := s.stats()) is not None}


def layer_sqnr(reference: nn.Module, quantized: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
    """Per-layer output SQNR (dB) of the quantised layers of ``quantized`` on the
    real inputs of the same layers in ``reference`` (its float original).

    Every layer of ``quantized`` that is a
    :class:`~svdkernels.quant.linear.LowRankQuantLinear` is fed, during a forward of
    ``reference`` on ``batches``, exactly the input its float counterpart receives;
    ``SQNR = 20·log10(‖y‖/‖y − ŷ‖)`` over all its rows, ``y`` the float output.

    Returns:
        ``{name: dB}``, in module order (layers never called are left out).
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

    with output_hooks(ref_modules, hook):
        run_batches(reference, batches, name="batches")
    return {n: sqnr_db(s, e) for n, (s, e) in sums.items() if s > 0 or e > 0}
