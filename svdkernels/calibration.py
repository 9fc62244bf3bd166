"""Calibration: what the inputs of a model's linear layers look like on real data.

One module shared by every layer that needs data (adapters: CorDA's covariance,
EVA's input rows; quant: SVDQuant's channel ranges and row sample; compress and
train: Grams, Fisher). Everything a caller asks for is gathered in **one pass**
over the batches, by forward hooks that are always removed afterwards (also when a
batch raises); modules run in eval mode (dropout off) and get their training flags
back afterwards.

A *batch* is whatever the model takes: a ``Mapping`` is passed as keyword
arguments (``model(**batch)``, e.g. a tokenizer's ``BatchEncoding``), a
``tuple``/``list`` as positional arguments, anything else as the single argument.

- :func:`run_batches`, :func:`eval_mode`, :func:`output_hooks`: the machinery;
- :func:`collect_input_stats` → :class:`InputStats` per layer: channel max/min/sum/
  sum of squares, a bounded row sample (uniform, or the first rows), and on request
  the input Gram ``XᵀX`` in float64.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

DEFAULT_MAX_ROWS = 512
"""Input rows kept per layer by default (SVDQuant's smoothing search)."""

ROW_MODES = ("sample", "first")

Hook = Callable[[str, torch.Tensor, torch.Tensor], None]

__all__ = [
    "DEFAULT_MAX_ROWS",
    "InputStats",
    "collect_input_stats",
    "eval_mode",
    "output_hooks",
    "run_batches",
]


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
    float32, ``m = min(n_rows, max_rows)`` input rows (a uniform sample without
    replacement, or the first ones: ``collect_input_stats(rows=...)``); ``n_rows``
    the number of rows seen; ``gram`` ``[K, K]`` float64, ``Σ xᵀx`` over every row,
    when it was asked for.
    """

    channel_max: torch.Tensor
    channel_min: torch.Tensor
    channel_sum: torch.Tensor
    channel_sumsq: torch.Tensor
    rows: torch.Tensor
    n_rows: int
    gram: Optional[torch.Tensor] = None

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

    @property
    def covariance(self) -> torch.Tensor:
        """``XᵀX / n`` ``[K, K]`` float64 (uncentred, as CorDA and SVD-LLM use it)."""
        if self.gram is None:
            raise ValueError("covariance: these statistics were collected without gram=True")
        return self.gram / self.n_rows


class _Accumulator:
    """Running max/min/sum/sum of squares (and Gram) of one layer's inputs plus a
    bounded row sample. ``rows="sample"``: priority sampling (every row gets a random
    key, the ``max_rows`` smallest keys are kept), deterministic for a given seed and
    batch order; ``rows="first"``: the first ``max_rows`` rows."""

    def __init__(self, max_rows: int, seed: int, rows: str, gram: bool) -> None:
        self.max_rows = max_rows
        self.mode = rows
        self.want_gram = gram
        self.gen = torch.Generator().manual_seed(seed)
        self.rows: torch.Tensor | None = None
        self.keys = torch.empty(0)
        self.cmax: torch.Tensor | None = None
        self.cmin: torch.Tensor | None = None
        self.csum: torch.Tensor | float = 0.0
        self.csumsq: torch.Tensor | float = 0.0
        self.gram: torch.Tensor | None = None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if x.shape[0] == 0:
            return
        x64 = x.double()
        if self.want_gram:
            g = x64.T @ x64
            self.gram = g if self.gram is None else self.gram + g
        x = x.float()
        bmax, bmin = x.amax(0), x.amin(0)
        self.cmax = bmax if self.cmax is None else torch.maximum(self.cmax, bmax)
        self.cmin = bmin if self.cmin is None else torch.minimum(self.cmin, bmin)
        self.csum = self.csum + x64.sum(0)
        self.csumsq = self.csumsq + x64.square().sum(0)
        if self.mode == "first":
            room = self.max_rows - (0 if self.rows is None else self.rows.shape[0])
            if room > 0:
                head = x[:room].cpu()
                self.rows = head if self.rows is None else torch.cat([self.rows, head])
        else:
            keys = torch.rand(x.shape[0], generator=self.gen)
            rows = x if self.rows is None else torch.cat([self.rows, x])
            keys = torch.cat([self.keys, keys])
            if keys.numel() > self.max_rows:
                keep = keys.topk(self.max_rows, largest=False).indices.sort().values
                rows, keys = rows[keep.to(rows.device)], keys[keep]
            self.rows, self.keys = rows, keys
        self.n += x.shape[0]

    def stats(self) -> InputStats | None:
        if self.n == 0:
            return None
        return InputStats(self.cmax, self.cmin, self.csum, self.csumsq, self.rows, self.n, self.gram)


def collect_input_stats(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    calib_batches: Iterable[Any],
    *,
    max_rows: int = DEFAULT_MAX_ROWS,
    seed: int = 0,
    rows: str = "sample",
    gram: bool = False,
) -> dict[str, InputStats]:
    """Run ``model`` on ``calib_batches`` once and gather the inputs of ``modules``.

    Args:
        model: the float model.
        modules: the layers to watch, by name (submodules of ``model``).
        calib_batches: an iterable of batches (module docstring), consumed once.
        max_rows: input rows kept per layer (tokens; all leading dims are flattened).
        seed: seed of the row sampling (``rows="sample"``).
        rows: ``"sample"`` (uniform sample of all rows) or ``"first"`` (the first ones).
        gram: also accumulate ``XᵀX [K, K]`` in float64 over every row.

    Returns:
        ``{name: InputStats}`` for every module that was called at least once.

    Raises:
        ValueError: ``calib_batches`` is empty, ``max_rows < 1``, an unknown ``rows``.
        TypeError: ``calib_batches`` is not an iterable of batches.
    """
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows: expected a positive int, got {max_rows!r}")
    if rows not in ROW_MODES:
        raise ValueError(f"rows: expected one of {ROW_MODES}, got {rows!r}")
    accs = {name: _Accumulator(max_rows, seed, rows, gram) for name in modules}
    with output_hooks(modules, lambda name, x, y: accs[name].add(x)):
        run_batches(model, calib_batches)
    return {name: st for name, a in accs.items() if (st := a.stats()) is not None}
