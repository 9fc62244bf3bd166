"""``svdkernels.adapt``: wrap a model's linear layers in an SVD adapter, all at once.

Layers are initialised per *shape group*: the weights of every target layer with
the same ``(out, in)`` are stacked and factorised by one batched call
(:func:`svdkernels.rsvd` for principal components, ``torch.linalg.svd`` where the
tail is needed), instead of one SVD per layer as peft does.
"""
from __future__ import annotations

import copy
import difflib
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any, Optional

import torch
from torch import nn

from svdkernels.calibration import collect_input_stats
from svdkernels.adapters.kind import KindLinear, kind_adapt
from svdkernels.adapters.kron import KronLinear
from svdkernels.adapters.methods import METHODS, Init, check_method_options, layer_regularizer, method_options
from svdkernels.adapters.modules import Targets, set_module
from svdkernels.adapters.svd_linear import SVDLinear
from svdkernels.errors import all_finite, check_finite_number
from svdkernels.ops.rsvd import rsvd

ALL_METHODS = (*METHODS, "soka")
CLASS_GATED = ("kind",)
"""Methods whose layers take ``forward(x, class_ids)`` (not in ALL_METHODS: a plain ``model(x)`` cannot run them)."""


def residual_weight(W0: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``W0 − up·down`` computed in float32 and rounded once to ``W0.dtype``.

    ``up [out, p]``, ``down [p, in]`` float32. The one place the residual is formed,
    so :func:`svdkernels.adapters.load_adapter` rebuilds it bit for bit."""
    return torch.addmm(W0.float(), up, down, alpha=-1).to(W0.dtype)


def build_layer(base: nn.Linear, method: str, init: Init) -> SVDLinear:
    """An :class:`SVDLinear` for ``base`` from ``init`` (factors cast to the weight's dtype)."""
    W0 = base.weight.detach()
    dtype, device = W0.dtype, W0.device

    def cast(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        # A fresh copy: init tensors may alias each other (PiSSA's A is also the removed
        # part's ``down``), and the trainable ones change in place.
        return None if t is None else t.to(dtype=dtype, device=device, copy=True).contiguous()

    removed = None
    if init.drop_weight:
        weight = None
    elif init.removed is not None:
        removed = tuple(t.to(dtype=torch.float32, device=device, copy=True).contiguous() for t in init.removed)
        weight = residual_weight(W0, *removed)
    else:
        weight = W0.clone()
    salt = None if init.salt is None else {k: cast(v) for k, v in init.salt.items()}
    bias = None if base.bias is None else base.bias.detach().clone()
    return SVDLinear.from_parts(
        method, weight=weight, bias=bias, A=cast(init.A), B=cast(init.B), scaling=init.scaling, E=cast(init.E),
        N=cast(init.N), trainable=init.trainable, removed=removed, salt=salt, config=init.config)


def _check_rank(rank: object, name: str, layer: nn.Linear, full_rank_ok: bool) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank: expected an int, got {type(rank).__name__}")
    k = min(layer.in_features, layer.out_features)
    top = k if full_rank_ok else k - 1
    if not 1 <= rank <= top:
        raise ValueError(f"rank: expected 1 <= rank <= {top} for layer {name!r} "
                         f"({layer.out_features}x{layer.in_features}), got {rank}")
    return rank


def _check_finite(name: str, layer: nn.Linear) -> None:
    if not all_finite(layer.weight.detach()):
        raise ValueError(f"model: expected finite weights in the target layers, got NaN or inf in {name + '.' if name else ''}weight")


def _shape_groups(layers: dict[str, nn.Linear]) -> dict[tuple, list[str]]:
    groups: dict[tuple, list[str]] = {}
    for name, m in layers.items():
        key = (m.out_features, m.in_features, m.weight.dtype, m.weight.device)
        groups.setdefault(key, []).append(name)
    return groups


def eva_components(inputs: dict[str, torch.Tensor], rank: int, *, rho: float = 2.0, seed: int = 0
                   ) -> dict[str, torch.Tensor]:
    """EVA's data-driven ``A``: per layer the top principal directions of its
    (centred) inputs, with ranks redistributed across layers.

    Each layer offers up to ``round(rank·rho)`` components (peft's cap, ρ = 2); the
    ``rank·L`` components with the largest explained-variance ratio over all layers
    are kept. EVA runs incremental PCA batch by batch until the components stop
    changing; here the PCA of all collected rows is taken at once (what it converges
    to), by one :func:`svdkernels.rsvd` call per input size.

    Returns ``{name: A [r_l, in]}`` (``r_l`` may be 0).
    """
    cap_of = {n: max(1, min(round(rank * rho), *X.shape)) for n, X in inputs.items()}
    comps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    by_shape: dict[tuple, list[str]] = {}
    for n, X in inputs.items():
        by_shape.setdefault((tuple(X.shape), cap_of[n]), []).append(n)
    for (shape, cap), names in by_shape.items():
        X = torch.stack([inputs[n] for n in names])
        X = X - X.mean(dim=1, keepdim=True)
        total = X.pow(2).sum(dim=(1, 2))  # total variance (times n)
        _, S, Vh = rsvd(X, cap, seed=seed)
        for i, n in enumerate(names):
            comps[n] = (S[i].pow(2) / total[i], Vh[i])
    ratios = torch.cat([r for r, _ in comps.values()])
    owners = [n for n, (r, _) in comps.items() for _ in range(r.shape[0])]
    keep = torch.topk(ratios, min(rank * len(inputs), ratios.numel())).indices.tolist()
    counts = dict.fromkeys(inputs, 0)
    for i in keep:
        counts[owners[i]] += 1
    return {n: comps[n][1][: counts[n]].contiguous() for n in inputs}


_ADAPT_KWARGS = ("rank", "targets", "calib_batches", "alpha", "seed", "modules_to_save")

_KRON_OPTIONS = ("a_shape", "b_shape", "init", "energy", "elbow", "a_rank", "b_rank", "scale")
"""``adapt(..., "soka", **kwargs)``: the :class:`KronLinear` arguments it passes on."""


_KIND_OPTIONS = ("tailor_rank", "classes")
"""``adapt(..., "kind", **kwargs)``: the :func:`~svdkernels.adapters.kind.kind_adapt` arguments it passes on."""


def _options(method: str) -> dict[str, Any]:
    if method == "soka":
        return dict.fromkeys(_KRON_OPTIONS)
    if method == "kind":
        return dict.fromkeys(_KIND_OPTIONS)
    return method_options(method)


def _check_unknown_kwargs(method: str, given: dict[str, Any], valid: Iterable[str]) -> None:
    """``TypeError`` for a keyword ``adapt`` does not take with ``method``, naming the
    nearest valid one, or else the nearest option of another method (and which)."""
    valid = sorted({*_ADAPT_KWARGS, *valid})
    for name in given:
        if name in valid:
            continue
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
        if close:
            hint = f"; did you mean {close[0]!r}?"
        else:
            others = {o: m for m in ALL_METHODS for o in _options(m)}
            near = difflib.get_close_matches(name, list(others), n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r} (an option of method {others[near[0]]!r})?" if near else ""
        raise TypeError(f"{name}: unexpected keyword argument to adapt(method={method!r}) "
                        f"(expected one of {valid}){hint}")


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed: expected an int in [0, 2**63), got {seed}")
    return seed


def _copy_linear(layer: nn.Linear) -> nn.Linear:
    """``layer`` with its own copies of the weight and bias (same dtype and device)."""
    new = copy.copy(layer)
    new._parameters = {k: None if p is None else nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                       for k, p in layer._parameters.items()}
    return new


def _replace(root: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` where ``name`` is in ``root`` and return the (new) root:
    ``name == ""`` is ``root`` itself (a bare ``nn.Linear`` was passed)."""
    if name == "":
        return module
    set_module(root, name, module)
    return root


def _saved_modules(model: nn.Module, modules_to_save: Targets, adapted: Iterable[str]) -> list[nn.Module]:
    """The modules ``modules_to_save`` names (peft's rule, as ``targets``), checked:
    each entry must name a module, and none may be an adapted layer."""
    if modules_to_save is None:
        return []
    if isinstance(modules_to_save, str):
        entries: list[str] = [modules_to_save]
        hit = lambda n, e: re.fullmatch(e, n) is not None  # noqa: E731
    else:
        if not isinstance(modules_to_save, Sequence) or not all(isinstance(t, str) for t in modules_to_save):
            raise TypeError(f"modules_to_save: expected None, a regex string or a list of module names, "
                            f"got {modules_to_save!r}")
        entries = list(modules_to_save)
        hit = lambda n, e: n == e or n.endswith("." + e)  # noqa: E731
    adapted = set(adapted)
    named = dict(model.named_modules())
    chosen: list[nn.Module] = []
    for e in entries:
        names = [n for n in named if n and hit(n, e)]
        if not names:
            raise ValueError(f"modules_to_save: expected names of modules of the model, got {e!r} which matches none")
        clash = [n for n in names if n in adapted or any(n.startswith(a + ".") for a in adapted if a)]
        if clash:
            raise ValueError(f"modules_to_save: expected modules the adapter does not wrap, got {e!r} matching "
                             f"the adapted layer(s) {clash[:4]}")
        chosen += [named[n] for n in names]
    return chosen


def freeze_non_adapter(model: nn.Module, keep: Iterable[nn.Module] = ()) -> nn.Module:
    """Freeze every parameter of ``model`` but the adapters' declared trainable ones;
    the parameters of the modules in ``keep`` are made trainable (peft's
    ``modules_to_save``). Returns ``model``."""
    mark_only_adapter_trainable(model)
    for m in keep:
        for p in m.parameters():
            if p.is_floating_point() or p.is_complex():
                p.requires_grad_(True)
    return model


def adapt(
    model: nn.Module,
    method: str,
    *,
    rank: int = 16,
    targets: Targets = None,
    calib_batches: Optional[Iterable[Any]] = None,
    alpha: Optional[float] = None,
    seed: int = 0,
    modules_to_save: Targets = None,
    **method_kwargs: Any,
) -> nn.Module:
    """Wrap the target ``nn.Linear`` layers of ``model`` in an SVD adapter, in place.

    Args:
        model: any module; its target linear layers are replaced by
            :class:`~svdkernels.adapters.SVDLinear` (``"soka"``: :class:`KronLinear`).
            A bare ``nn.Linear`` is adapted too: the adapter layer is *returned*
            (use the return value).
        method: one of ``lora``, ``pissa``, ``milora``, ``svfit``, ``clip_svd``,
            ``sorsa``, ``salt``, ``kasa``, ``corda``, ``eva``, ``nlora``, ``effort``,
            ``adalora``, ``soka`` (parametrisations in ``svdkernels/adapters/methods.py``).
        rank: adapter rank ``r`` (1 ≤ r ≤ min(out, in); ignored by ``clip_svd``; the
            number of Kronecker terms for ``soka``; for ``eva`` the mean rank).
        targets: which ``nn.Linear`` layers: ``None`` (all), a regex matching the whole
            module name, or a list of names / dotted suffixes (peft's ``target_modules``).
        calib_batches: model inputs (tensors, tuples or dicts) for ``corda`` and ``eva``.
        alpha: branch scaling ``alpha / rank`` (default ``alpha = rank``: scaling 1).
        seed: seed for the randomized SVD and random initialisations, in ``[0, 2**63)``.
        modules_to_save: modules (not adapted) that stay trainable, named as
            ``targets`` names layers (peft's ``modules_to_save``, e.g. a
            classification head ``["classifier"]``); every other parameter that is
            not an adapter's is frozen.
        **method_kwargs: per method, e.g. ``corda_mode="kpm"``, ``gamma`` (SORSA),
            ``salt_rank``, ``train_core_only`` (NLoRA), ``oversample``/``n_iter`` (rsvd),
            ``rho`` (EVA), ``energy``/``elbow``/``scale`` (SoKA). A keyword the method
            does not take raises ``TypeError`` naming the nearest valid one; a
            non-finite or negative hyper-parameter raises ``ValueError``.

    Returns:
        ``model`` (or, for a bare ``nn.Linear``, its adapter layer). As with peft,
        only the adapters' declared parameters and those of ``modules_to_save`` have
        ``requires_grad=True``; every other parameter of the model is frozen.

    Every argument is checked before the model is changed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(method, str) or method not in (*ALL_METHODS, *CLASS_GATED):
        raise ValueError(f"method: expected one of {(*ALL_METHODS, *CLASS_GATED)}, got {method!r}")
    options = _options(method)
    _check_unknown_kwargs(method, method_kwargs, options)
    _check_seed(seed)
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank: expected an int, got {type(rank).__name__}")
    if method not in ("soka", "kind"):
        check_method_options(method, method_kwargs, options)
    from svdkernels.adapters import sharded  # on use: it imports this module (and torch.distributed)

    layers = sharded.find_target_linears(model, targets)  # find_linears, FSDP2-wrapped layers included
    keep = _saved_modules(model, modules_to_save, layers)
    for name, layer in layers.items():
        _check_finite(name, layer)
    if sharded.is_sharded(layers):  # FSDP2 (DTensor weights): factors from the sharded rsvd, no gather
        sharded.check_sharded(method, layers)
    if method == "soka":
        if rank < 1:
            raise ValueError(f"rank: expected an int >= 1 (Kronecker terms), got {rank}")
        # SoKA replaces its base's weight by the residual: work on copies, so a layer
        # that fails (e.g. an a_shape that fits another layer only) leaves the model as it was.
        built = {name: KronLinear(_copy_linear(layer), rank=rank, seed=seed, **{"init": "soka", **method_kwargs})
                 for name, layer in layers.items()}
        for name, layer in built.items():
            model = _replace(model, name, layer)
        return freeze_non_adapter(model, keep)
    if method == "kind":
        return freeze_non_adapter(kind_adapt(model, rank=rank, targets=targets, seed=seed, **method_kwargs), keep)
    if method == "soma":
        from svdkernels.adapters.soma import soma_targets

        layers = {n: layers[n] for n in soma_targets(model, method_kwargs.pop("freeze_blocks", 0), targets)}
    spec = METHODS[method]
    if method != "clip_svd":
        for name, layer in layers.items():
            _check_rank(rank, name, layer, spec.full_rank_ok)
    if alpha is not None:
        check_finite_number("alpha", alpha, low=0.0, low_inclusive=False)
    alpha = float(rank if alpha is None else alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha: expected a positive finite number, got {alpha}")
    if sharded.is_sharded(layers):
        return freeze_non_adapter(sharded.adapt_sharded(model, method, layers, rank=rank, alpha=alpha, seed=seed,
                                                        **method_kwargs), keep)
    method_kwargs = dict(method_kwargs)
    stats: dict[str, torch.Tensor] = {}
    if spec.needs is not None:
        if calib_batches is None:
            raise ValueError(f"calib_batches: expected model inputs, method {method!r} needs layer inputs, got None")
        stats = _layer_inputs(model, layers, calib_batches, kind=spec.needs)
    if method == "eva":
        stats = eva_components(stats, rank, rho=method_kwargs.pop("rho", 2.0), seed=seed)
    built_svd: dict[str, SVDLinear] = {}
    for (out_f, in_f, _, _), names in _shape_groups(layers).items():
        W = torch.stack([layers[n].weight.detach().float() for n in names])
        extra = {}
        if method == "corda":
            extra["covariance"] = torch.stack([stats[n] for n in names]).to(W.device)
        if method == "eva":
            extra["components"] = [stats[n].to(W.device) for n in names]
        inits = spec.init(W, rank, seed=seed, alpha=alpha, **extra, **method_kwargs)
        for name, init in zip(names, inits):
            if init.A.shape[0] == 0:
                continue  # EVA gave this layer no components: it stays a plain nn.Linear
            built_svd[name] = build_layer(layers[name], method, init)
    for name, layer in built_svd.items():  # replaced only once every layer is built
        model = _replace(model, name, layer)
    return freeze_non_adapter(model, keep)


def _layer_inputs(
    model: nn.Module, layers: dict[str, nn.Linear], calib_batches: Any, *, kind: str, max_rows: int = 8192
) -> dict[str, torch.Tensor]:
    """Per layer name, from one pass over ``calib_batches``: ``kind="covariance"``,
    ``XᵀX/n [in, in]`` float64 over every input row (CorDA); ``kind="inputs"``, the
    first ``max_rows`` input rows ``[n, in]`` float32 (EVA)."""
    covariance = kind == "covariance"
    # The covariance needs no rows: keep one instead of max_rows per layer.
    keep = 1 if covariance else max_rows
    stats = collect_input_stats(model, layers, calib_batches, max_rows=keep, rows="first", gram=covariance)
    missing = [n for n in layers if n not in stats]
    if missing:
        raise ValueError(f"calib_batches: layers {missing[:4]} saw no input while the batches ran")
    out = {n: stats[n].covariance if covariance else stats[n].rows for n in layers}
    for n, t in out.items():
        # A NaN here would fail the whole shape group's SVD with "failed to converge".
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"calib_batches: expected finite activations, but layer {n!r} received NaN or inf "
                             "inputs (from the batches or the layers before it; its weight is finite)")
    return out


def adapter_layers(model: nn.Module) -> dict[str, SVDLinear]:
    """Every :class:`SVDLinear` in ``model``, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SVDLinear)}


def mark_only_adapter_trainable(model: nn.Module) -> nn.Module:
    """Freeze every parameter of ``model`` except those the adapters declare trainable."""
    declared = {id(p) for m in model.modules() if isinstance(m, (SVDLinear, KronLinear, KindLinear))
                for p in m.parameters(recurse=False) if p.requires_grad}
    for p in model.parameters():
        p.requires_grad_(id(p) in declared)
    return model


def regularization_loss(model: nn.Module) -> torch.Tensor:
    """The sum of every adapter layer's regulariser (SORSA, SALT, KaSA, Effort,
    AdaLoRA; zero when no layer has one). Add it to the task loss."""
    total: Optional[torch.Tensor] = None
    for layer in adapter_layers(model).values():
        r = layer_regularizer(layer)
        if r is not None:
            total = r if total is None else total + r
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), device=None if p is None else p.device)
    return total
