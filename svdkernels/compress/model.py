"""``compress_model``: replace a model's linear layers by low-rank factors.

Methods (each as its paper defines it; the weighting in ``factor.py``):

- ``"svd"``: plain truncated SVD of ``W``, the baseline (no data).
- ``"fwsvd"``: Hsu et al. 2022, *Language model compression with weighted low-rank
  factorization*: SVD of ``diag(√I)·W``, ``I_i = Σ_j (∂L/∂W_ij)²`` the row Fisher
  summed over the calibration batches.
- ``"asvd"``: Yuan et al. 2023, *ASVD: activation-aware SVD*: SVD of ``W·diag(s^α)``,
  ``s`` the mean ``|x|`` per input channel, ``α = 0.5``.
- ``"svd_llm"``: Wang et al. 2024, *SVD-LLM: truncation-aware singular value
  decomposition*: SVD of ``W·S``, ``S = chol(XᵀX)`` (float64, shifted when not
  positive definite): dropping ``σᵢ`` costs exactly ``σᵢ`` of output error on the
  calibration data; then the closed-form least-squares update of the left factor.
- ``"basis_sharing"``: Wang et al. 2024, *Basis Sharing: cross-layer parameter
  sharing for large language model compression*: layers of one kind in consecutive
  groups of ``group_size`` share one whitened input basis (``down``); each keeps its
  own coefficients (``up``), refitted by least squares on its own inputs. Kinds not
  listed in ``shared`` (attention output, MLP down projection) get SVD-LLM.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any, Optional

import torch
from torch import nn

from svdkernels.adapters.modules import Targets, find_linears, matches, set_module
from svdkernels.calibration import LayerStats, LossFn, collect_layer_stats
from svdkernels.compress.budget import Unit, allocate_global, allocate_uniform
from svdkernels.compress.factor import (
    Spectrum,
    check_gram,
    factors,
    left_spectrum,
    output_spectrum,
    refit_up,
    shared_factors,
    shared_spectrum,
    whitening,
)
from svdkernels.compress.linear import LowRankLinear
from svdkernels.errors import all_finite

METHODS = ("svd", "fwsvd", "asvd", "svd_llm", "basis_sharing")
BUDGETS = ("global", "uniform")
DATA_METHODS = ("fwsvd", "asvd", "svd_llm", "basis_sharing")

SHARED_KINDS = ("query", "key", "value", "q_proj", "k_proj", "v_proj", "up_proj", "gate_proj",
                "intermediate.dense", "w1", "w3", "fc1")
"""Basis Sharing's default shared kinds (q, k, v, up, gate), by dotted suffix; the
paper keeps the attention output and MLP down projections private."""

_KWARGS = {"svd": (), "fwsvd": ("loss", "seed"), "asvd": ("alpha",), "svd_llm": ("refit",),
           "basis_sharing": ("group_size", "shared", "refit")}

__all__ = ["BUDGETS", "METHODS", "SHARED_KINDS", "compress_model", "layer_kind"]


def layer_kind(name: str) -> str:
    """A layer's name with its block indices replaced by ``*``:
    ``encoder.layer.3.attention.self.query`` → ``encoder.layer.*.attention.self.query``."""
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name)


def _check_keep(keep: object) -> float:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"keep: expected a float in (0, 1], got {type(keep).__name__}")
    if not math.isfinite(keep) or not 0 < keep <= 1:
        raise ValueError(f"keep: expected a fraction in (0, 1], got {keep}")
    return float(keep)


def _check_finite(name: str, layer: nn.Linear) -> None:
    if not all_finite(layer.weight.detach()):
        raise ValueError(f"{name}.weight: expected finite values, got NaN or inf")
    if layer.bias is not None and not torch.isfinite(layer.bias.detach()).all():
        raise ValueError(f"{name}.bias: expected finite values, got NaN or inf")


def _method_options(method: str, kw: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(kw) - set(_KWARGS[method]))
    if unknown:
        raise TypeError(f"{unknown[0]}: not an option of method {method!r} (options: {list(_KWARGS[method])})")
    opts = {"alpha": 0.5, "group_size": 2, "shared": SHARED_KINDS, "loss": None, "seed": 0, "refit": True, **kw}
    a = opts["alpha"]
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a < 0:
        raise ValueError(f"alpha: expected a finite number >= 0, got {a!r}")
    g = opts["group_size"]
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise ValueError(f"group_size: expected an int >= 1, got {g!r}")
    sh = opts["shared"]
    if not isinstance(sh, str):
        if not isinstance(sh, Sequence) or not all(isinstance(t, str) for t in sh):
            raise TypeError(f"shared: expected a regex string or a list of layer-name suffixes, got {sh!r}")
        opts["shared"] = list(sh)
    if not isinstance(opts["refit"], bool):
        raise TypeError(f"refit: expected a bool, got {type(opts['refit']).__name__}")
    if opts["loss"] is not None and not callable(opts["loss"]):
        raise TypeError(f"loss: expected a callable fn(output, batch) -> scalar, got {type(opts['loss']).__name__}")
    return opts


def compress_model(
    model: nn.Module,
    calib_batches: Optional[Iterable[Any]] = None,
    *,
    method: str = "svd_llm",
    keep: float = 0.8,
    budget: str = "global",
    targets: Targets = None,
    **method_kwargs: Any,
) -> nn.Module:
    """Replace the target ``nn.Linear`` layers of ``model`` by :class:`LowRankLinear`
    factors, in place (module docstring for the methods and their papers).

    ``keep`` is the fraction of the targeted layers' **weight parameters** that is
    kept, over all of them together: a layer ``W [m, n]`` at rank ``r`` stores
    ``r·(m + n)``, a group of ``G`` layers sharing a basis ``r·(n + G·m)``, a layer
    left dense ``m·n``; biases are kept as they are and not counted. ``keep = 0.8``
    is "20% compression" in the papers' tables.

    Args:
        model: any module; it is changed only after every factor is computed.
        calib_batches: model inputs (module docstring of :mod:`svdkernels.calibration`),
            consumed once, by one pass of hooks (forward and backward for
            ``fwsvd``). Required by every method but ``"svd"`` (which ignores it).
        method: ``"svd"``, ``"fwsvd"``, ``"asvd"``, ``"svd_llm"``, ``"basis_sharing"``.
        keep: fraction in ``(0, 1]`` (above); at ``1`` nothing changes.
        budget: ``"global"``: ranks allocated across layers to minimise the
            predicted change of the model's output at the parameter count, greedy on
            the error removed per parameter
            (:func:`svdkernels.compress.budget.allocate_global`). Dropping triplet
            ``i`` of a layer costs ``(λᵢ/Σλ)·‖Y‖²·s`` (Gauss–Newton, isotropic): the
            share of the layer's output energy ``‖Y‖²`` it carries in the method's
            weighted spectrum ``λ`` (for SVD-LLM exactly its output error), times
            ``s``, the mean squared gradient of the loss (the ``fwsvd`` loss rule
            below) per entry of the layer's output ``Y``. So the calibration pass
            also runs backward. ``"svd"`` uses relative weight errors (it sees no
            data). A layer whose share reaches its dense size stays ``nn.Linear``.
            ``"uniform"``: every layer at the ratio ``keep``,
            ``r = ⌊keep·m·n/(m + n)⌋``.
        targets: which ``nn.Linear`` layers (as :func:`svdkernels.adapt`): ``None``
            (all), a regex matching the whole name, or a list of names / dotted suffixes.
        **method_kwargs: ``fwsvd``: ``loss=fn(output, batch)`` (default the model's
            own ``output.loss``, else :func:`svdkernels.calibration.probe_loss`, the
            distance to the float outputs under Gaussian-perturbed targets),
            ``seed``; ``asvd``: ``alpha`` (0.5); ``svd_llm``: ``refit`` (True: the
            least-squares update of ``up``); ``basis_sharing``: ``group_size`` (2),
            ``shared`` (kinds sharing a basis, :data:`SHARED_KINDS`), ``refit``.

    Returns:
        ``model``.

    Raises:
        ValueError: unknown ``method``/``budget``; ``keep`` outside ``(0, 1]``;
            ``calib_batches`` missing for a data-aware method, or a target layer it
            never reached; a layer below rank 1 at ``keep``; a Gram still indefinite
            after the shift; non-finite weights (before anything changes).
        TypeError: a malformed argument or an unknown method option.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if budget not in BUDGETS:
        raise ValueError(f"budget: expected one of {BUDGETS}, got {budget!r}")
    keep = _check_keep(keep)
    opts = _method_options(method, method_kwargs)
    layers = find_linears(model, targets)
    for name, layer in layers.items():
        _check_finite(name, layer)
    if method in DATA_METHODS and calib_batches is None:
        raise ValueError(f"calib_batches: method {method!r} needs calibration inputs, got None")
    if keep >= 1:
        return model
    units = _units(layers, method, opts)
    stats = _stats(model, layers, units, calib_batches, method, opts, sensitivity=budget == "global")
    plans = _spectra(layers, units, stats, method, opts)
    allocate = allocate_global if budget == "global" else allocate_uniform
    ranks = allocate([p.unit for p in plans], keep)
    new = _build(layers, plans, ranks, stats, method, opts)
    for name, module in new.items():
        set_module(model, name, module)
    return model


# ---------------------------------------------------------------------------


class _Plan:
    """One unit's spectrum and what building its factors needs."""

    def __init__(self, unit: Unit, build: Any) -> None:
        self.unit = unit
        self.build = build  # callable(rank) -> {name: (up, down)}


def _units(layers: dict[str, nn.Linear], method: str, opts: dict[str, Any]) -> list[list[str]]:
    """Layer names per unit: single layers, or Basis Sharing groups of one kind."""
    if method != "basis_sharing" or opts["group_size"] == 1:
        return [[n] for n in layers]
    by_kind: dict[tuple, list[str]] = {}
    units: list[list[str]] = []
    for n, m in layers.items():
        if matches(n, opts["shared"]):
            by_kind.setdefault((layer_kind(n), tuple(m.weight.shape), m.weight.dtype, m.weight.device), []).append(n)
        else:
            units.append([n])
    g = opts["group_size"]
    for names in by_kind.values():
        units += [names[i:i + g] for i in range(0, len(names), g)]
    return units


SENSITIVITY_BATCHES = 4
"""Batches that run backward for the global budget's sensitivities (one scalar per
layer: a few batches estimate it; FWSVD's Fisher uses every batch)."""


def _stats(model: nn.Module, layers: dict[str, nn.Linear], units: list[list[str]], calib_batches: Any,
           method: str, opts: dict[str, Any], sensitivity: bool) -> dict[str, LayerStats]:
    if method == "svd":
        return {}
    # SVD-LLM on a layer with fewer outputs than inputs needs only W·XᵀX·Wᵀ, the Gram
    # of its outputs (m×m), not the input Gram (n×n): 16x less work for an MLP's down
    # projection. Shared bases need the input Grams.
    single = {ns[0] for ns in units if len(ns) == 1}
    out_side = {n for n in single if layers[n].out_features < layers[n].in_features}
    # ASVD under the global budget also gathers Grams, to price each direction by the
    # output error it carries (see _output_errors).
    whiten = method in ("svd_llm", "basis_sharing") or (method == "asvd" and sensitivity)
    stats = collect_layer_stats(
        model, layers, calib_batches, gram={n for n in layers if n not in out_side} if whiten else False,
        out_gram=out_side if whiten else False, abs_mean=method == "asvd", fisher=method == "fwsvd",
        sensitivity=sensitivity, loss=opts["loss"], seed=opts["seed"],
        backward_batches=None if method == "fwsvd" else SENSITIVITY_BATCHES)
    missing = [n for n in layers if n not in stats or (method == "fwsvd" and stats[n].fisher is None)]
    if missing:
        raise ValueError(f"calib_batches: layers {missing[:4]} saw no input (or got no gradient) while the "
                         "batches ran; exclude them with targets=")
    return stats


def _unit_norm(v: torch.Tensor) -> torch.Tensor:
    """``v`` over its mean (per row of a batch); all-zero rows become ones."""
    mean = v.mean(-1, keepdim=True)
    return torch.where(mean > 0, v / torch.where(mean > 0, mean, 1), torch.ones_like(v))


def _gram(stats: dict[str, LayerStats], names: list[str], device: torch.device) -> torch.Tensor:
    G = torch.stack([stats[n].gram for n in names]).to(device)
    d = G.diagonal(dim1=-2, dim2=-1).mean(-1)
    return G / torch.where(d > 0, d, 1)[:, None, None]


def _layer_weight(stats: dict[str, LayerStats], layers: dict[str, nn.Linear], name: str) -> float:
    """The Gauss–Newton worth of a layer's whole output: ``‖Y‖²·‖∂L/∂Y‖²/(T·m)``
    (its output energy times the mean squared sensitivity per output entry), 1 without
    sensitivity statistics."""
    st = stats.get(name)
    if st is None or st.out_grad_sq is None or st.out_sq is None:
        return 1.0
    rows = max(st.backward_rows, 1)
    return st.out_sq / rows * st.out_grad_sq / (rows * layers[name].out_features)


def _spectra(layers: dict[str, nn.Linear], units: list[list[str]], stats: dict[str, LayerStats], method: str,
             opts: dict[str, Any]) -> list[_Plan]:
    """Per unit, its spectrum; units of one shape go through one batched call."""
    groups: dict[tuple, list[list[str]]] = {}
    for names in units:
        w = layers[names[0]].weight
        groups.setdefault((len(names), *w.shape, w.dtype, w.device), []).append(names)
    plans: dict[tuple[str, ...], _Plan] = {}
    for (size, m, n, wdtype, device), group in groups.items():
        names = [ns[0] for ns in group]
        W = torch.stack([torch.stack([layers[x].weight.detach() for x in ns]) for ns in group]).double()
        if size > 1:
            plans.update(_shared_plans(group, W, stats, layers, m, n, device, wdtype))
            continue
        W = W[:, 0]
        alloc: Optional[torch.Tensor] = None  # what ranks are allocated by, when not spec.lam
        if method == "fwsvd":
            # Output-side weighting: the input-side machinery on Wᵀ (q_i = row Fisher).
            q = _unit_norm(torch.stack([stats[x].fisher for x in names]).to(device))
            Wt = W.mT.contiguous()
            spec = left_spectrum(Wt, p=q, weight_dtype=wdtype)
            G = None
        elif method == "asvd":
            s = torch.stack([stats[x].abs_mean for x in names]).to(device)
            p = _unit_norm(_unit_norm(s).clamp_min(1e-6).pow(2 * opts["alpha"]))
            spec = left_spectrum(W, p=p, weight_dtype=wdtype)
            G = None
            if all(stats[x].gram is not None or stats[x].out_gram is not None for x in names):
                alloc = _output_errors(W, spec, stats, names, device)
        elif method in ("svd_llm", "basis_sharing"):
            if m < n:
                # W·XᵀX·Wᵀ is the output Gram: its eigenvectors are U (factor.py). No
                # Cholesky factor is needed on this side, hence no shift: the truncation
                # is optimal for the Gram itself, singular or not, and the least-squares
                # update of ``up`` is the identity.
                C = torch.stack([stats[x].out_gram for x in names]).to(device)
                check_gram(C, names)
                spec = output_spectrum(C / C.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)[:, None, None],
                                       wdtype)
                G = None
            elif m == n:
                G0 = _gram(stats, names, device)
                check_gram(G0, names)
                spec = left_spectrum(W, P=G0, weight_dtype=wdtype)
                G = None
            else:
                G0 = _gram(stats, names, device)
                G, L, shifted = whitening(G0, names)
                spec = left_spectrum(W, P=G, L=L, weight_dtype=wdtype)
                # The update changes ``up`` only where the whitening was shifted (else
                # ``U_r`` is already the least-squares optimum), so only there it runs.
                G = G0 if opts["refit"] and bool(shifted.any()) else None
        else:
            spec = left_spectrum(W, weight_dtype=wdtype)
            G = None
        k = min(m, n)
        for i, x in enumerate(names):
            unit = Unit([x], m + n, m * n, k, (spec.lam if alloc is None else alloc)[i],
                        _layer_weight(stats, layers, x))
            plans[(x,)] = _Plan(unit, _single_builder(x, W, spec, i, G, transpose=method == "fwsvd"))
    return [plans[tuple(ns)] for ns in units]


def _output_errors(W: torch.Tensor, spec: Spectrum, stats: dict[str, LayerStats], names: list[str],
                   device: torch.device) -> torch.Tensor:
    """The spectrum to allocate ranks by, for a left projection ``U_r·U_rᵀ·W`` whose
    ``U`` is not the whitened one (ASVD): direction ``i`` carries output error
    ``eᵢ = uᵢᵀ·W·XᵀX·Wᵀ·uᵢ`` on the calibration data (``Σᵢ eᵢ = ‖W·Xᵀ‖²``), so the
    global budget prices each direction by what dropping it costs in output.
    Returns ``e`` ``[B, k]`` (not sorted)."""
    U = spec.basis
    if stats[names[0]].out_gram is not None:
        C = torch.stack([stats[x].out_gram for x in names]).to(device)
        e = (U * (C @ U)).sum(-2)
    else:
        G = torch.stack([stats[x].gram for x in names]).to(device)
        M = W.mT @ U  # [B, n, k]
        e = (M * (G @ M)).sum(-2)
    return e.clamp_min(0)


def _single_builder(name: str, W: torch.Tensor, spec: Any, i: int, G: Optional[torch.Tensor], transpose: bool):
    def build(rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        one = Spectrum(spec.lam[i:i + 1], spec.basis[i:i + 1])
        if transpose:
            Wt = W[i:i + 1].mT
            up_t, down_t = factors(Wt, one, rank)  # Wᵀ ≈ up_t·down_t
            return {name: (down_t.mT[0], up_t.mT[0])}
        Wi = W[i:i + 1]
        up, down = factors(Wi, one, rank)
        if G is not None:
            up = refit_up(Wi, G[i:i + 1], down, up)
        return {name: (up[0], down[0])}

    return build


def _shared_plans(group: list[list[str]], W: torch.Tensor, stats: dict[str, LayerStats],
                  layers: dict[str, nn.Linear], m: int, n: int, device: torch.device, wdtype: torch.dtype) -> dict[tuple[str, ...], _Plan]:
    size = len(group[0])
    Gs = torch.stack([_gram(stats, ns, device) for ns in group])  # [B, G, n, n]
    G_sum, L, _ = whitening(Gs.sum(1) / size, [ns[0] for ns in group])
    lam, V = shared_spectrum(W, L, wdtype)
    plans = {}
    for i, ns in enumerate(group):
        unit = Unit(list(ns), n + size * m, size * m * n, min(n, size * m), lam[i],
                    sum(_layer_weight(stats, layers, x) for x in ns))

        def build(rank: int, i: int = i, ns: list[str] = ns) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
            ups, down = shared_factors(W[i:i + 1], L[i:i + 1], lam[i:i + 1], V[i:i + 1], rank)
            # Each layer's coefficients refitted on its own inputs (its own Gram).
            ups = refit_up(W[i], Gs[i], down.expand(size, -1, -1), ups[0])
            return {x: (ups[j], down[0]) for j, x in enumerate(ns)}

        plans[tuple(ns)] = _Plan(unit, build)
    return plans


def _build(layers: dict[str, nn.Linear], plans: list[_Plan], ranks: Sequence[Optional[int]],
           stats: dict[str, LayerStats], method: str, opts: dict[str, Any]) -> dict[str, LowRankLinear]:
    new: dict[str, LowRankLinear] = {}
    for plan, rank in zip(plans, ranks):
        if rank is None:
            continue  # left dense
        parts = plan.build(rank)
        shared_down: Optional[nn.Parameter] = None
        for name, (up, down) in parts.items():
            base = layers[name]
            dtype, device = base.weight.dtype, base.weight.device
            if len(parts) > 1:
                if shared_down is None:
                    shared_down = nn.Parameter(down.to(dtype=dtype, device=device).contiguous(),
                                               requires_grad=base.weight.requires_grad)
                d = shared_down
            else:
                d = down.to(dtype=dtype, device=device).contiguous()
            bias = None if base.bias is None else base.bias.detach().clone()
            layer = LowRankLinear(up.to(dtype=dtype, device=device).contiguous(), d, bias)
            for p in layer.parameters():
                p.requires_grad_(base.weight.requires_grad)
            new[name] = layer
    return new
