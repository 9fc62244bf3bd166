"""Quantise a whole model with SVDQuant (Li et al. 2024, "SVDQuant: Absorbing
Outliers by Low-Rank Components for 4-Bit Diffusion Models"; Nunchaku).

:func:`quantize_model` replaces the model's ``nn.Linear`` layers, in place, by
:class:`~svdkernels.quant.linear.LowRankQuantLinear`:

1. calibration: one pass over ``calib_batches`` with forward hooks
   (:mod:`svdkernels.calibration`) records, per layer, per-channel input
   statistics and a sample of up to 512 input rows (every layer sees the float
   model's activations);
2. per layer and for every ``α`` of the grid, the smoothing factors
   ``λ_j = s(X_j)^α / max|W_:,j|^(1−α)`` with ``s`` the activation statistic
   (both clamped below at ``1e-5`` of their largest value so that dead channels
   give neither 0 nor inf, then divided by their geometric mean: int4
   quantisation is invariant to a common factor, and this keeps ``x/λ`` and
   ``W·diag(λ)`` in the original range);
3. per candidate, the rank-``r`` branch from :func:`svdkernels.rsvd` of
   ``Ŵ = W·diag(λ)`` (one batched call for all candidates) and the int4 residual;
   the candidate whose quantised layer gives the smallest output MSE on the
   sampled calibration rows (against the float layer) wins (the layer's math on
   its dequantised operands, :func:`candidate_output`, equal to its output up to
   float32 rounding and ten times cheaper than the reference W4A4 GEMM);
4. the winner's branch is refined ``refine_iters`` times by
   ``L ← SVD_r(Ŵ − Q(Ŵ − L))``, kept if it lowers the calibration MSE measured
   through the layer itself.

For unsigned activations (W4A4, layer inputs ``>= -0.171875`` during
calibration, e.g. after a GELU) the statistic is that of the shifted input
``X_j + 0.171875``, which is what gets quantised.

Choices, measured on all-MiniLM-L6-v2 (per-layer output SQNR on held-out
sentences, averaged over its 37 linear layers, W4A4, r = 32; see
``svdkernels/bench/quantize_model.py``):

- ``DEFAULT_ALPHAS = (0, 0.1, …, 1)``: SVDQuant grid-searches ``α`` on output
  error; extending the grid beyond 1 was never chosen.
- ``act_stat="rms"``: the per-channel RMS of the inputs instead of the paper's
  ``max|X_j|`` (``act_stat="absmax"``): 22.2 against 21.7 dB. The maximum is
  set by a few outlier tokens, while the error is summed over all tokens.
- ``DEFAULT_REFINE_ITERS = 3``: 0 / 1 / 3 / 5 iterations give 21.5 / 21.9 /
  22.2 / 22.3 dB (W4A16: 23.5 / 24.7 / 25.4 dB for 0 / 1 / 3); refining only
  the winner of the grid is as good as refining every candidate.
- unsigned activations are chosen automatically (``unsigned=None``) when the
  calibration minimum is ``>= -0.171875``.

The choices per layer are recorded in ``model.svdkernels_quant_config``
(:class:`QuantConfig`: ``layers[name]`` a :class:`LayerChoice` with ``alpha``,
``unsigned``, the calibration MSE and SQNR; ``skipped[name]`` the reason a layer
was left in float).

:func:`quantize_model_rtn` is the naive baseline: round-to-nearest int4 weights,
no smoothing, no branch (the same layer with ``rank = 0`` and ``λ = 1``).
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from svdkernels.errors import strict_kwargs
from svdkernels.calibration import DEFAULT_MAX_ROWS, InputStats, collect_input_stats
from svdkernels.quant.evaluate import sqnr_db
from svdkernels.quant.linear import (
    DEFAULT_REFINE_ITERS,
    WEIGHTS,
    LowRankQuantLinear,
    check_acts,
    check_rank,
    decompose,
)
from svdkernels.formats.int4 import GROUP_SIZE, UNSIGNED_SHIFT, dequantize_act, quantize_act

DEFAULT_ALPHAS = tuple(i / 10 for i in range(11))
"""The grid of smoothing exponents searched per layer."""

_CANDIDATE_ELEMENTS = 2**25
"""Candidates are decomposed in chunks of at most this many weight elements (memory)."""

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

Targets = Union[None, str, Sequence[str]]

__all__ = [
    "DEFAULT_ALPHAS",
    "DEFAULT_REFINE_ITERS",
    "LayerChoice",
    "QuantConfig",
    "candidate_output",
    "linear_weight_bytes",
    "quantize_model",
    "quantize_model_rtn",
    "select_layers",
    "smoothing_factors",
]


@dataclass
class LayerChoice:
    """What :func:`quantize_model` chose for one layer.

    ``alpha``: the smoothing exponent (``None``: no smoothing, ``λ = 1``);
    ``refined``: the refined branch was kept (it lowered the calibration MSE);
    ``calib_mse``/``calib_sqnr_db``: output error of the quantised layer on the
    sampled calibration rows (``None`` for :func:`quantize_model_rtn`);
    ``weight_rel_error``: ``‖Ŵ − L̂ − Q(Ŵ − L̂)‖/‖Ŵ‖`` in the smoothed space.
    """

    rank: int
    acts: Optional[str]
    unsigned: bool
    alpha: Optional[float] = None
    refined: bool = False
    calib_mse: Optional[float] = None
    calib_sqnr_db: Optional[float] = None
    weight_rel_error: Optional[float] = None


@dataclass
class QuantConfig:
    """Settings of a quantisation run and its per-layer record
    (``model.svdkernels_quant_config``; saved with the model by
    :func:`svdkernels.quant.save_quantized`)."""

    weights: str = "int4"
    acts: Optional[str] = "int4"
    rank: int = 32
    alphas: Optional[list[float]] = None
    act_stat: str = "rms"
    refine_iters: int = 0
    dtype: Optional[str] = None
    layers: dict[str, LayerChoice] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), allow_nan=True)

    @classmethod
    def from_json(cls, text: str) -> "QuantConfig":
        d = json.loads(text)
        d["layers"] = {k: LayerChoice(**v) for k, v in d.get("layers", {}).items()}
        return cls(**d)


def _replace(model: nn.Module, name: str, layer: nn.Module) -> nn.Module:
    """Put ``layer`` at ``name`` and return the root: ``name == ""`` is ``model``
    itself (a bare ``nn.Linear`` was passed), whose replacement is returned."""
    if name == "":
        return layer
    model.set_submodule(name, layer)
    return model


def _record(model: nn.Module, config: QuantConfig) -> None:
    # A second call (other targets) adds to the record of the first.
    old = getattr(model, "svdkernels_quant_config", None)
    if isinstance(old, QuantConfig):
        config.layers = {**old.layers, **config.layers}
        config.skipped = {k: v for k, v in {**old.skipped, **config.skipped}.items() if k not in config.layers}
    model.svdkernels_quant_config = config


# ---------------------------------------------------------------------------
# Argument checks and layer selection


def _check_common(model: object, weights: object, acts: object, dtype: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if weights not in WEIGHTS:
        raise ValueError(f"weights: expected 'int4' (the only weight format implemented), got {weights!r}")
    check_acts(acts)
    if dtype is not None and dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype: expected None, torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def select_layers(model: nn.Module, targets: Targets) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers of ``model`` that ``targets`` names.

    ``None``: all of them; a ``str``: those whose full name matches it as a regular
    expression (``re.fullmatch``, as peft's ``target_modules`` string); a sequence
    of ``str``: those whose name equals an entry or ends with ``"." + entry``.

    Raises:
        TypeError: ``targets`` of another type.
        ValueError: ``targets`` (or one entry of it) matches no ``nn.Linear``.
    """
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if targets is None:
        return linears
    if isinstance(targets, str):
        chosen = {n: m for n, m in linears.items() if re.fullmatch(targets, n)}
        if not chosen:
            raise ValueError(f"targets: expected a regex matching some nn.Linear name, got {targets!r} matching none")
        return chosen
    if not isinstance(targets, Sequence) or not all(isinstance(t, str) for t in targets):
        raise TypeError(f"targets: expected None, a str or a sequence of str, got {targets!r}")
    if not targets:
        raise ValueError("targets: expected at least one name, got an empty sequence")
    for t in targets:
        if not any(_matches(n, t) for n in linears):
            raise ValueError(
                f"targets: expected names of nn.Linear layers (or their suffixes), got {t!r} matching none"
            )
    return {n: m for n, m in linears.items() if any(_matches(n, t) for t in targets)}


def _usable_layers(
    model: nn.Module, targets: Targets, rank: int
) -> tuple[dict[str, nn.Linear], dict[str, str]]:
    """Layers to quantise and layers skipped (with the reason). A layer the
    format cannot hold is skipped when ``targets`` is ``None`` and an error when it
    was targeted explicitly; non-finite weights are always an error."""
    chosen = select_layers(model, targets)
    usable, skipped = {}, {}
    for name, layer in chosen.items():
        N, K = layer.weight.shape
        try:
            if K % GROUP_SIZE:
                raise ValueError(
                    f"targets: layer {name!r} has in_features = {K}, expected a multiple of {GROUP_SIZE} "
                    "(the int4 group size)"
                )
            check_rank(rank, N, K, where=name)
        except ValueError as e:
            if targets is not None:
                raise
            skipped[name] = str(e)
            continue
        if not layer.weight.is_floating_point() or not torch.isfinite(layer.weight).all():
            raise ValueError(f"model: layer {name!r} has non-finite (or non-float) weights; expected finite floats")
        usable[name] = layer
    if not usable:
        raise ValueError(f"model: expected at least one nn.Linear that can be quantised, got none ({skipped})")
    return usable, skipped


# ---------------------------------------------------------------------------
# Smoothing and the per-layer search


def smoothing_factors(x_stat: torch.Tensor, w_absmax: torch.Tensor, alphas: Sequence[float]) -> torch.Tensor:
    """``λ [len(alphas), K]`` with ``λ_j = x_j^α / w_j^(1−α)`` per ``α``.

    ``x_stat [K]``: the activation statistic per input channel (RMS or
    ``max|X_j|`` of the, possibly shifted, inputs); ``w_absmax [K]``:
    ``max|W_:,j|``. Both are clamped below at ``1e-5·max`` (no 0 or inf), and
    every row is divided by its geometric mean (a common factor changes nothing
    in int4 but the magnitudes).
    """
    a = torch.tensor(list(alphas), dtype=torch.float32, device=x_stat.device)[:, None]
    lx = x_stat.float().clamp(min=1e-5 * float(x_stat.max()) + 1e-30).log()
    lw = w_absmax.float().clamp(min=1e-5 * float(w_absmax.max()) + 1e-30).log()
    log_lam = a * lx - (1 - a) * lw
    return (log_lam - log_lam.mean(1, keepdim=True)).exp()


def candidate_output(layer: LowRankQuantLinear, residual: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``layer(X)`` for ``X [m, K]`` computed from the float32 dequantised residual
    ``residual [N, K]`` (``deq(layer.qweight)``) in one matmul: the reference math
    of the ops (``deq(Q(x/λ))·deq(R̂)ᵀ`` or ``x·deq(R)ᵀ``, plus the branch and the
    bias) with another summation order, so equal to the layer's output up to
    float32 rounding. The reference W4A4 GEMM sums group by group, which costs
    about ten times more; the search ranks every candidate this way and measures
    only the winner through the layer itself."""
    Xc = X.to(layer.dtype)
    if layer.acts is None:
        x_op = Xc.float()
    else:
        xq, xs = quantize_act(Xc, unsigned=layer.unsigned, smooth=layer.smooth)
        # The GEMM multiplies q·s as stored: (x + c)/λ when unsigned, whose extra
        # c/λ·deq(R̂)ᵀ the compensated bias cancels.
        x_op = dequantize_act(xq, xs, unsigned=layer.unsigned) + (UNSIGNED_SHIFT if layer.unsigned else 0.0)
    y = x_op @ residual.T + (Xc.float() @ layer.L_down.float().T) @ layer.L_up.float().T
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y.to(layer.dtype)


def _best_candidate(
    W: torch.Tensor,
    b: Optional[torch.Tensor],
    lam: torch.Tensor,
    X: torch.Tensor,
    Y: torch.Tensor,
    *,
    rank: int,
    refine_iters: int,
    acts: Optional[str],
    unsigned: bool,
    dtype: torch.dtype,
    seed: int,
) -> tuple[int, LowRankQuantLinear, float]:
    """Build the layer of every candidate ``λ [B, K]`` and return the one with the
    smallest output MSE over ``X [m, K]`` against ``Y [m, N]`` (:func:`candidate_output`):
    ``(index, layer, relative weight error)``. Ties keep the first (smaller ``α``)."""
    N, K = W.shape
    chunk = max(1, _CANDIDATE_ELEMENTS // (N * K))
    best: Optional[tuple[float, int, LowRankQuantLinear, float]] = None
    for start in range(0, lam.shape[0], chunk):
        lam_c = lam[start : start + chunk]
        d = decompose(W, lam_c, rank=rank, refine_iters=refine_iters,
                      smoothed_residual=acts is not None, dtype=dtype, seed=seed)
        for i in range(lam_c.shape[0]):
            cand = LowRankQuantLinear.from_parts(d.qweight[i], d.scales[i], d.L_down[i], d.L_up[i],
                                                 lam_c[i].contiguous(), b, acts=acts, unsigned=unsigned)
            mse = float((candidate_output(cand, d.residual[i], X).float() - Y).square().mean())
            if best is None or mse < best[0]:
                rel = float(d.weight_error[i]) / float(torch.linalg.vector_norm(W * lam_c[i]))
                best = (mse, start + i, cand, rel)
    return best[1:]  # type: ignore[index]  # lam has at least one row


def _layer_mse(layer: LowRankQuantLinear, X: torch.Tensor, Y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((layer(X).float() - Y).square().mean())


def _search(
    layer: nn.Linear,
    stats: InputStats,
    *,
    rank: int,
    acts: Optional[str],
    unsigned: bool,
    alphas: Optional[Sequence[float]],
    act_stat: str,
    refine_iters: int,
    dtype: torch.dtype,
    seed: int,
) -> tuple[LowRankQuantLinear, LayerChoice]:
    """Pick ``α`` on the grid (unrefined candidates), then refine the chosen one.

    Refining only the winner costs ``refine_iters`` single-candidate steps instead
    of that many for every grid point; on MiniLM it gives the same average SQNR
    as refining every candidate (the ranking of ``α`` hardly changes). The refined
    layer is kept only if its calibration MSE (through the layer) is lower.
    """
    W = layer.weight.detach().float()
    b = None if layer.bias is None else layer.bias.detach().float()
    K = W.shape[1]
    if alphas is None:
        lam = torch.ones(1, K, device=W.device)
    else:
        shift = UNSIGNED_SHIFT if unsigned else 0.0
        if act_stat == "rms":
            x_stat = stats.rms(shift)
        else:
            x_stat = stats.channel_max + shift if unsigned else stats.absmax
        lam = smoothing_factors(x_stat.to(W.device), W.abs().amax(0), alphas)
    X = stats.rows.to(W.device)
    Y = F.linear(X, W, b)
    kw = dict(rank=rank, acts=acts, unsigned=unsigned, dtype=dtype, seed=seed)
    idx, chosen, rel = _best_candidate(W, b, lam, X, Y, refine_iters=0, **kw)
    mse = _layer_mse(chosen, X, Y)
    refined = False
    if refine_iters and rank:
        _, layer_r, rel_r = _best_candidate(W, b, lam[idx : idx + 1], X, Y, refine_iters=refine_iters, **kw)
        mse_r = _layer_mse(layer_r, X, Y)
        if mse_r < mse:
            mse, chosen, rel, refined = mse_r, layer_r, rel_r, True
    choice = LayerChoice(
        rank=rank, acts=acts, unsigned=unsigned,
        alpha=None if alphas is None else float(alphas[idx]),
        refined=refined, calib_mse=mse, calib_sqnr_db=sqnr_db(float(Y.square().mean()), mse),
        weight_rel_error=rel,
    )
    return chosen, choice


# ---------------------------------------------------------------------------
# Public entry points


@strict_kwargs
def quantize_model(
    model: nn.Module,
    calib_batches: Iterable[Any],
    *,
    rank: int = 32,
    weights: str = "int4",
    acts: Optional[str] = "int4",
    targets: Targets = None,
    alphas: Optional[Sequence[float]] = DEFAULT_ALPHAS,
    act_stat: str = "rms",
    refine_iters: int = DEFAULT_REFINE_ITERS,
    unsigned: Optional[bool] = None,
    dtype: Optional[torch.dtype] = None,
    max_rows: int = DEFAULT_MAX_ROWS,
    seed: int = 0,
) -> nn.Module:
    """SVDQuant post-training quantisation of ``model``'s linear layers, in place.

    Args:
        model: a float model; its ``nn.Linear`` layers are replaced (as peft does).
        calib_batches: iterable of model inputs (a ``Mapping`` is passed as
            keyword arguments, a tuple/list as positional ones, anything else as the
            one argument), consumed once; a few sentences or images suffice.
        rank: rank of the low-rank branch, a multiple of 16 (0: none).
        weights: weight format; only ``"int4"``.
        acts: ``"int4"`` (W4A4) or ``None`` (W4A16).
        targets: which ``nn.Linear`` layers (:func:`select_layers`); ``None``: all,
            skipping (and recording) those the format cannot hold
            (``in_features`` not a multiple of 64, fewer than ``rank`` features, or
            never called during calibration), which are errors when targeted.
        alphas: the grid of smoothing exponents; ``None``: no smoothing (``λ = 1``).
        act_stat: the activation statistic in ``λ``: ``"rms"`` (default) or
            ``"absmax"`` (the paper's ``max|X_j|``); see the module docstring.
        refine_iters: iterations of ``L ← SVD_r(Ŵ − Q(Ŵ − L))``.
        unsigned: unsigned int4 activations (W4A4): ``None`` decides per layer
            (calibration minimum ``>= -0.171875``), ``True``/``False`` forces it.
        dtype: compute dtype of the quantised layers (``None``: each weight's dtype).
        max_rows: calibration rows kept per layer for the search.
        seed: seed of the row sampling and the randomized SVDs.

    Returns:
        ``model``, with ``model.svdkernels_quant_config`` (:class:`QuantConfig`);
        for a bare ``nn.Linear``, the :class:`LowRankQuantLinear` that replaces it.

    Raises:
        TypeError/ValueError naming the argument: an unknown keyword (naming the
        nearest), unknown ``weights``/``acts``,
        ``rank`` not a multiple of 16 or too large for a targeted layer, a targeted
        layer with ``in_features`` not a multiple of 64, ``targets`` matching
        nothing, non-finite weights, empty ``calib_batches`` or ones giving a layer
        non-finite inputs (``calib_batches`` is blamed, not the weight), a bad grid.
    """
    _check_common(model, weights, acts, dtype)
    check_rank(rank)
    if alphas is not None:
        alphas = list(alphas)
        if not alphas or not all(not isinstance(a, bool) and isinstance(a, (int, float)) and 0 <= a <= 1
                                 for a in alphas):
            raise ValueError(f"alphas: expected None or a non-empty sequence of numbers in [0, 1], got {alphas!r}")
    if act_stat not in ("rms", "absmax"):
        raise ValueError(f"act_stat: expected 'rms' or 'absmax', got {act_stat!r}")
    if isinstance(refine_iters, bool) or not isinstance(refine_iters, int) or refine_iters < 0:
        raise ValueError(f"refine_iters: expected a non-negative int, got {refine_iters!r}")
    if unsigned not in (None, True, False):
        raise TypeError(f"unsigned: expected None (automatic), True or False, got {unsigned!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**62:
        raise ValueError(f"seed: expected an int in [0, 2**62), got {seed}")
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows: expected an int >= 1, got {max_rows!r}")
    usable, skipped = _usable_layers(model, targets, rank)
    stats = collect_input_stats(model, usable, calib_batches, max_rows=max_rows, seed=seed)
    for name in usable:
        st = stats.get(name)
        if st is not None and not all(bool(torch.isfinite(t).all()) for t in (st.channel_max, st.channel_min,
                                                                                 st.channel_sumsq)):
            raise ValueError(f"calib_batches: expected finite activations, but layer {name!r} received NaN or inf "
                             "inputs during calibration (from the batches or the layers before it; its weight "
                             "is finite)")
    for name in [n for n in usable if n not in stats]:
        if targets is not None:
            raise ValueError(f"targets: layer {name!r} was never called on calib_batches; expected it to be")
        skipped[name] = "never called on calib_batches (no activation statistics)"
        del usable[name]
    config = QuantConfig(weights=weights, acts=acts, rank=rank, alphas=alphas, act_stat=act_stat,
                         refine_iters=refine_iters, dtype=None if dtype is None else str(dtype))
    config.skipped = skipped
    for name, layer in usable.items():
        st = stats[name]
        uns = acts is not None and (st.min >= -UNSIGNED_SHIFT if unsigned is None else unsigned)
        qlayer, config.layers[name] = _search(
            layer, st, rank=rank, acts=acts, unsigned=uns, alphas=alphas, act_stat=act_stat, refine_iters=refine_iters,
            dtype=dtype or layer.weight.dtype, seed=seed,
        )
        model = _replace(model, name, qlayer)
    _record(model, config)
    return model


@strict_kwargs
def quantize_model_rtn(
    model: nn.Module,
    *,
    acts: Optional[str] = "int4",
    targets: Targets = None,
    dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """The naive baseline, in place: round-to-nearest int4 weights (group 64), no
    smoothing, no low-rank branch, signed int4 (``acts="int4"``) or 16-bit
    (``acts=None``) activations. Needs no calibration data.

    Layers are selected and skipped as by :func:`quantize_model`; returns ``model``
    with ``model.svdkernels_quant_config``.
    """
    _check_common(model, "int4", acts, dtype)
    usable, skipped = _usable_layers(model, targets, 0)
    config = QuantConfig(weights="int4", acts=acts, rank=0, dtype=None if dtype is None else str(dtype),
                         skipped=skipped)
    for name, layer in usable.items():
        qlayer = LowRankQuantLinear.from_float(
            layer.weight.detach(), None if layer.bias is None else layer.bias.detach(),
            rank=0, refine_iters=0, acts=acts, unsigned=False, dtype=dtype,
        )
        config.layers[name] = LayerChoice(rank=0, acts=acts, unsigned=False)
        model = _replace(model, name, qlayer)
    _record(model, config)
    return model


def linear_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the (quantised or float) linear layers' weights, by layer name:
    for a :class:`LowRankQuantLinear` all its buffers, for an ``nn.Linear`` weight
    and bias."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (LowRankQuantLinear, nn.Linear)):
            tensors = [*m.buffers(recurse=False), *m.parameters(recurse=False)]
            out[name] = sum(t.numel() * t.element_size() for t in tensors)
    return out

