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
- :func:`collect_layer_stats` → :class:`LayerStats` per layer: the float64 input
  Gram, ``Σ|x|`` per channel and the row Fisher of a loss (forward and backward in
  the same single pass), for low-rank compression.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

DEFAULT_MAX_ROWS = 512
"""Input rows kept per layer by default (SVDQuant's smoothing search)."""

ROW_MODES = ("sample", "first")

Hook = Callable[[str, torch.Tensor, torch.Tensor], None]

__all__ = [
    "DEFAULT_MAX_ROWS",
    "InputStats",
    "LayerStats",
    "collect_input_stats",
    "collect_layer_stats",
    "eval_mode",
    "model_loss",
    "output_hooks",
    "probe_loss",
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


# ---------------------------------------------------------------------------
# Gram, mean |x| and row Fisher in one pass (low-rank compression)


@dataclass
class LayerStats:
    """What one linear layer (``K`` inputs, ``N`` outputs) saw during
    :func:`collect_layer_stats`, each only when asked for.

    ``n_rows`` input rows seen; ``gram`` ``[K, K]`` float64 ``Σ xᵀx`` over every
    row; ``abs_sum`` ``[K]`` float64 ``Σ |x|`` per input channel; ``fisher``
    ``[N]`` float64, the row Fisher of FWSVD (Hsu et al. 2022):
    ``Σ_batches Σ_j (∂L/∂W_ij)²`` per output row ``i``; with ``sensitivity``,
    ``out_grad_sq = Σ_batches ‖∂L/∂Y‖²_F`` (how much the loss moves with the layer's
    output ``Y``) and ``out_sq = ‖Y − bias‖²_F``, both over the ``backward_rows``
    rows of the batches that ran backward; ``out_gram`` ``[N, N]`` float64
    ``Σ (y − bias)ᵀ(y − bias)`` over every row (``= W·XᵀX·Wᵀ``, the input Gram seen
    from the output side: far cheaper when ``N < K``).
    """

    n_rows: int
    gram: Optional[torch.Tensor] = None
    abs_sum: Optional[torch.Tensor] = None
    fisher: Optional[torch.Tensor] = None
    out_grad_sq: Optional[float] = None
    out_sq: Optional[float] = None
    out_gram: Optional[torch.Tensor] = None
    backward_rows: int = 0

    @property
    def abs_mean(self) -> torch.Tensor:
        """``mean_rows |x|`` per input channel ``[K]`` float64 (ASVD's activation scale)."""
        if self.abs_sum is None:
            raise ValueError("abs_mean: these statistics were collected without abs_mean=True")
        return self.abs_sum / self.n_rows


LossFn = Callable[[Any, Any], torch.Tensor]


def _float_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    values = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    return [t for v in values for t in _float_tensors(v)]


def probe_loss(seed: int = 0) -> LossFn:
    """The default Fisher loss for a model without its own: ``Σ ⟨y, z⟩`` over the
    floating-point tensors ``y`` of the output (a tensor, or those in a tuple, list
    or mapping such as a ``ModelOutput``), ``z ~ N(0, I)`` drawn afresh per batch
    (generator seeded by ``seed``).

    Its gradient ``Jᵀz`` is that of ``½‖(y₀ + z) − y‖²`` at ``y = y₀``: the distance
    to the float model's outputs with *perturbed targets* (sampled from a Gaussian
    around them). Perturbing the targets rather than the inputs keeps the float model
    as the reference, and ``E_z[(Jᵀz)²]`` is the Gauss–Newton (true Fisher)
    diagonal of that Gaussian model, ``diag(JᵀJ)``.
    """
    gen = torch.Generator().manual_seed(seed)

    def loss(output: Any, batch: Any) -> torch.Tensor:
        ys = _float_tensors(output)
        if not ys:
            raise ValueError("loss: the model output holds no floating-point tensor; pass loss=fn(output, batch)")
        total = 0
        for y in ys:
            z = torch.randn(y.shape, generator=gen, dtype=torch.float32).to(device=y.device, dtype=y.dtype)
            total = total + (y * z).sum()
        return total

    return loss


def model_loss(output: Any, batch: Any) -> Optional[torch.Tensor]:
    """``output.loss`` (or ``output["loss"]``) when the model computed one, else None."""
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None


class _StatsAccumulator:
    def __init__(self, gram: bool, abs_mean: bool, out_gram: bool) -> None:
        self.want_gram, self.want_abs, self.want_out_gram = gram, abs_mean, out_gram
        self.gram: Optional[torch.Tensor] = None
        self.out_gram: Optional[torch.Tensor] = None
        self.backward_rows = 0
        self.abs_sum: Optional[torch.Tensor] = None
        self.fisher: Optional[torch.Tensor] = None
        self.out_grad_sq: Optional[float] = None
        self.out_sq: Optional[float] = None
        self.n = 0

    def add_output(self, y: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        y64 = y.detach().reshape(-1, y.shape[-1]).double()
        if bias is not None:
            y64 = y64 - bias.detach().double()
        g = y64.T @ y64
        self.out_gram = g if self.out_gram is None else self.out_gram.add_(g)

    def add(self, parts: tuple[int, Optional[torch.Tensor], Optional[torch.Tensor]]) -> None:
        n, g, a = parts
        self.n += n
        if g is not None and self.want_gram:
            self.gram = g.clone() if self.gram is None else self.gram.add_(g)
        if a is not None and self.want_abs:
            self.abs_sum = a.clone() if self.abs_sum is None else self.abs_sum.add_(a)


def collect_layer_stats(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    calib_batches: Iterable[Any],
    *,
    gram: Union[bool, Collection[str]] = False,
    out_gram: Union[bool, Collection[str]] = False,
    abs_mean: bool = False,
    fisher: bool = False,
    sensitivity: bool = False,
    loss: Optional[LossFn] = None,
    seed: int = 0,
    backward_batches: Optional[int] = None,
) -> dict[str, LayerStats]:
    """Run ``model`` on ``calib_batches`` once and gather, per linear layer of
    ``modules``, the input Gram (float64), ``Σ|x|`` per channel and the row Fisher.

    Layers fed the same input tensor in a forward (a transformer's q, k and v) share
    one Gram product per batch instead of computing it once each.

    Fisher and sensitivity (``fisher=True``, ``sensitivity=True``): each batch runs
    forward *and* backward (only the gradients asked for are computed), the loss being
    ``loss(output, batch)`` if given, else the model's own loss (``output.loss``,
    e.g. a batch with ``labels``), else :func:`probe_loss`; only the target weights
    get gradients (``torch.autograd.grad``: no ``.grad`` is written and
    ``requires_grad`` flags are restored). Modules run in eval mode in every case.

    Args:
        model: the float model.
        modules: ``{name: nn.Linear}`` to watch (submodules of ``model``).
        calib_batches: an iterable of batches (module docstring), consumed once.
        gram, out_gram: gather the input (output) Gram: for every layer (True), none
            (False) or the layers named.
        abs_mean, fisher, sensitivity: which other statistics to gather
            (:class:`LayerStats`).
        loss: ``fn(output, batch) -> scalar`` for the Fisher and the sensitivity.
        seed: seed of the default probe loss.
        backward_batches: with ``fisher``/``sensitivity``, only the first this many
            batches run backward (None: all); the others run forward only, without
            gradients, for the remaining statistics.

    Returns:
        ``{name: LayerStats}`` for every module called at least once.

    Raises:
        ValueError: ``calib_batches`` is empty; the loss is not a finite scalar.
        TypeError: ``calib_batches`` is not an iterable of batches.
    """
    def wanted(flag: Union[bool, Collection[str]], name: str) -> bool:
        return flag if isinstance(flag, bool) else name in flag

    accs = {name: _StatsAccumulator(wanted(gram, name), abs_mean, wanted(out_gram, name)) for name in modules}
    # Per batch: input tensor (held, so its id cannot be reused) -> its contributions.
    cache: dict[int, tuple[torch.Tensor, tuple]] = {}

    def hook(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        acc = accs[name]
        hit = cache.get(id(x))
        if hit is None or hit[0] is not x or (acc.want_gram and hit[1][1] is None):
            x2 = x.detach().reshape(-1, x.shape[-1])
            x64 = x2.double()
            g = x64.T @ x64 if acc.want_gram else None
            a = x64.abs().sum(0) if abs_mean else None
            hit = (x, (x2.shape[0], g, a))
            cache[id(x)] = hit
        acc.add(hit[1])
        if acc.want_out_gram:
            acc.add_output(y, getattr(modules[name], "bias", None))

    if not (fisher or sensitivity):
        def clear_cache(*_: Any) -> None:
            cache.clear()

        with output_hooks(modules, hook):
            pre = model.register_forward_pre_hook(clear_cache)
            try:
                run_batches(model, calib_batches)
            finally:
                pre.remove()
    else:
        _backward_pass(model, modules, calib_batches, accs, hook, cache, loss, seed, fisher, sensitivity,
                       backward_batches)
    return {name: LayerStats(a.n, a.gram, a.abs_sum, a.fisher, a.out_grad_sq, a.out_sq, a.out_gram, a.backward_rows)
            for name, a in accs.items() if a.n > 0}


def _backward_pass(model: nn.Module, modules: Mapping[str, nn.Module], calib_batches: Iterable[Any],
                   accs: dict[str, _StatsAccumulator], hook: Hook, cache: dict, loss: Optional[LossFn],
                   seed: int, fisher: bool, sensitivity: bool, backward_batches: Optional[int]) -> None:
    if not isinstance(calib_batches, Iterable) or isinstance(calib_batches, (torch.Tensor, str, Mapping)):
        raise TypeError("calib_batches: expected an iterable of batches (e.g. a list), "
                        f"got {type(calib_batches).__name__}")
    names = list(modules)
    weights = [modules[n].weight for n in names]
    flags = [w.requires_grad for w in weights]
    probe = probe_loss(seed)
    n = 0
    outputs: dict[str, torch.Tensor] = {}

    def hook_and_keep(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        hook(name, x, y)
        if sensitivity and y.requires_grad:
            outputs[name] = y
            b = getattr(modules[name], "bias", None)
            sq = float((y.detach() - b.detach() if b is not None else y.detach()).double().square().sum())
            acc = accs[name]
            acc.out_sq = (acc.out_sq or 0.0) + sq
            acc.backward_rows += y.numel() // y.shape[-1]

    try:
        for w in weights:
            w.requires_grad_(True)
        with eval_mode(model), output_hooks(modules, hook_and_keep):
            for batch in calib_batches:
                cache.clear()
                backward = backward_batches is None or n < backward_batches
                with torch.set_grad_enabled(backward):
                    if isinstance(batch, Mapping):
                        out = model(**batch)
                    elif isinstance(batch, (tuple, list)):
                        out = model(*batch)
                    else:
                        out = model(batch)
                if not backward:
                    outputs.clear()
                    n += 1
                    continue
                value = loss(out, batch) if loss is not None else model_loss(out, batch)
                if value is None:
                    value = probe(out, batch)
                if not isinstance(value, torch.Tensor) or value.numel() != 1 or not torch.isfinite(value).all():
                    raise ValueError(f"loss: expected a finite scalar tensor, got {value!r:.80}")
                outs = [outputs.get(nm) for nm in names]
                seen = [i for i, o in enumerate(outs) if o is not None and o.requires_grad]
                wanted = (weights if fisher else []) + [outs[i] for i in seen]
                grads = torch.autograd.grad(value.reshape(()), wanted, allow_unused=True) if wanted else []
                for name, g in zip(names if fisher else [], grads):
                    if g is None:
                        continue
                    f = g.detach().double().square().sum(1)
                    a = accs[name]
                    a.fisher = f if a.fisher is None else a.fisher.add_(f)
                for i, g in zip(seen, grads[len(names) if fisher else 0:]):
                    if g is not None:
                        a = accs[names[i]]
                        a.out_grad_sq = (a.out_grad_sq or 0.0) + float(g.detach().double().square().sum())
                outputs.clear()
                n += 1
    finally:
        cache.clear()
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
    if n == 0:
        raise ValueError("calib_batches: expected at least one batch, got an empty iterable")
