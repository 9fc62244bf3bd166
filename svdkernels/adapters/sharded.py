"""``svdkernels.adapt`` on a model sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``).

Each target ``nn.Linear`` must be its own FSDP unit (``fully_shard(layer)`` before the
enclosing module), so its weight is a DTensor ``[out, in]`` placed ``Shard(0)`` and its
replacement can become an FSDP unit of its own. Per shape group, the local row shards
are stacked into one DTensor ``[L, out, in]`` ``Shard(1)`` and factorised by
:func:`~svdkernels.ops.rsvd_sharded.rsvd_sharded` with the seed the single-process
``adapt`` uses, so the factors equal the single-process ones to fp32 rounding; then:

- ``U``'s rows and the residual ``W₀ − up·down`` stay on the rank that holds those rows
  of ``W₀`` (computed from the local shard: the residual's rows are the single-process
  formula on the same rows);
- the adapter layer is built on the meta device, sharded with ``fully_shard`` on the
  layer's mesh, materialised with ``to_empty`` (only the local shards are allocated)
  and its local shards filled: the FSDP2 recipe for initialising a sharded model.

The only gathered tensor is ``removed_up [out, r]`` (a frozen buffer: FSDP does not shard
buffers), a factor, never a weight. Supported: the methods whose initialisation is the
top-``r`` SVD of ``W`` (:data:`SHARDED_METHODS`). MiLoRA, Effort, KaSA, SALT and CLIP-SVD
need the whole spectrum (an exact SVD of each weight, which needs it on one rank), CorDA
and EVA layer inputs, SoKA a Kronecker factorisation: those raise ``ValueError``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from svdkernels.adapters.adapt import _replace, _shape_groups, residual_weight
from svdkernels.adapters.methods import Init, _pissa_like, _spectral
from svdkernels.adapters.modules import Targets, find_linears, matches
from svdkernels.adapters.svd_linear import SVDLinear

# adapt imports this module on every call: a torch built without torch.distributed
# (no DTensor, no FSDP) must still adapt plain models.
if dist.is_available():
    from torch.distributed.tensor import DTensor, Shard

Tensor = torch.Tensor

# From the top-r SVD to the per-layer Inits, exactly as methods._init_<name> builds them.
_FROM_SVD: dict[str, Callable[..., list[Init]]] = {
    "pissa": lambda U, S, Vh, scaling, **_: _pissa_like(U, S, Vh, scaling),
    "svfit": lambda U, S, Vh, scaling, **_: _spectral(U, S, Vh, ("lora_E",)),
    "sorsa": lambda U, S, Vh, scaling, gamma=4e-4, **_: _spectral(U, S, Vh, ("lora_A", "lora_E", "lora_B"),
                                                                {"gamma": gamma}),
}
SHARDED_METHODS = tuple(_FROM_SVD)
"""Methods :func:`svdkernels.adapt` supports on an FSDP2-sharded model."""


def _fsdp_linear(m: nn.Module) -> bool:
    if not dist.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    # fully_shard swaps a module's class for FSDP<Class>(FSDPModule, Class).
    return isinstance(m, FSDPModule) and type(m).__bases__ == (FSDPModule, nn.Linear)


def find_target_linears(model: nn.Module, targets: Targets) -> dict[str, nn.Linear]:
    """``modules.find_linears`` that also sees the ``nn.Linear`` layers ``fully_shard``
    wrapped (their class is ``FSDPLinear``, which its exact type check skips)."""
    wrapped = {n: m for n, m in model.named_modules() if _fsdp_linear(m) and matches(n, targets)}
    if not wrapped:
        return find_linears(model, targets)
    try:
        plain = find_linears(model, targets)  # also checks targets' type
    except ValueError:
        plain = {}
    return {n: m for n, m in model.named_modules() if n in wrapped or n in plain}


def is_sharded(layers: dict[str, nn.Linear]) -> bool:
    """Whether any target layer's weight is a DTensor."""
    return dist.is_available() and any(isinstance(layer.weight, DTensor) for layer in layers.values())


def check_sharded(method: str, layers: dict[str, nn.Linear]) -> None:
    """``ValueError`` naming the method, or the layer, that a sharded ``adapt`` cannot handle."""
    from torch.distributed.fsdp import FSDPModule

    if method not in SHARDED_METHODS:
        raise ValueError(f"method: expected one of {SHARDED_METHODS} for a model sharded with FSDP2 (DTensor weights), "
                         f"got {method!r}: its initialisation needs the whole spectrum, layer inputs or a Kronecker "
                         "factorisation of each weight, which would gather it on one rank")
    mesh = None
    for name, layer in layers.items():
        W = layer.weight
        if not isinstance(W, DTensor) or not isinstance(layer, FSDPModule):
            raise ValueError(f"model: expected every target layer sharded by its own fully_shard (call fully_shard on "
                             f"each target nn.Linear before the enclosing modules), got layer {name!r} with "
                             f"{'a DTensor weight owned by an enclosing module' if isinstance(W, DTensor) else 'a plain weight'}")
        if W.device_mesh.ndim != 1 or tuple(W.placements) != (Shard(0),):
            raise ValueError(f"model: expected layer weights placed (Shard(0),) on a 1-D mesh, got layer {name!r} "
                             f"with {tuple(W.placements)} on a {W.device_mesh.ndim}-D mesh")
        if mesh is None:
            mesh = W.device_mesh
        elif W.device_mesh != mesh:
            raise ValueError(f"model: expected every target layer on one device mesh, got layer {name!r} on another")


def _local_rows(full: Tensor, param: DTensor) -> Tensor:
    """The rows of ``full`` that FSDP2 keeps on this rank for ``param`` (its ``Shard(0)``
    follows ``torch.chunk``: chunks of ``ceil(n / world)`` rows, the last ones short or empty)."""
    n, world = full.shape[0], param.device_mesh.size()
    size = -(-n // world)
    start = min(param.device_mesh.get_local_rank() * size, n)
    return full[start:start + param.to_local().shape[0]]


def _build(layer: nn.Linear, method: str, init: Init, mesh: Any) -> SVDLinear:
    """The FSDP2-sharded :class:`SVDLinear` for ``layer`` from ``init``, whose ``B`` and
    ``removed[0]`` are this rank's rows and ``A``, ``E``, ``removed[1]`` whole."""
    from torch.distributed.fsdp import fully_shard

    W0 = layer.weight.to_local()
    dtype = W0.dtype
    up, down = (t.float().contiguous() for t in init.removed)
    local = {"weight": residual_weight(W0, up, down), "lora_B": init.B.to(dtype)}
    whole = {"lora_A": init.A.to(dtype), "lora_E": None if init.E is None else init.E.to(dtype)}
    if layer.bias is not None:
        local["bias"] = layer.bias.to_local()
    rows = (layer.out_features, up.shape[1])
    up_full = DTensor.from_local(up, mesh, [Shard(0)], run_check=False, shape=torch.Size(rows),
                                 stride=(rows[1], 1)).full_tensor()  # a factor [out, r], the one gather

    def meta(t: Tensor | None, shape: tuple[int, ...] | None = None) -> Tensor | None:
        return None if t is None else torch.empty(shape or t.shape, dtype=t.dtype, device="meta")

    out_f, in_f = layer.out_features, layer.in_features
    new = SVDLinear.from_parts(
        method, weight=meta(W0, (out_f, in_f)), bias=meta(layer.bias, (out_f,)), A=meta(whole["lora_A"]),
        B=meta(init.B.to(dtype), (out_f, init.B.shape[1])), scaling=init.scaling, E=meta(whole["lora_E"]),
        trainable=init.trainable, removed=(meta(up_full), meta(down)), config=init.config)
    fully_shard(new, mesh=mesh)
    new.to_empty(device=W0.device)  # allocates the local shards only
    with torch.no_grad():
        for name, p in new.named_parameters():
            src = local[name] if name in local else _local_rows(whole[name], p)
            p.to_local().copy_(src)
        new.rank_mask.fill_(True)
        new.removed_up.copy_(up_full)
        new.removed_down.copy_(down)
    return new


def adapt_sharded(model: nn.Module, method: str, layers: dict[str, nn.Linear], *, rank: int, alpha: float,
                  seed: int, oversample: int = 10, n_iter: int = 2, **method_kwargs: Any) -> nn.Module:
    """:func:`svdkernels.adapt`'s work for FSDP2-sharded ``layers`` (checked by :func:`check_sharded`;
    arguments already validated by ``adapt``). Returns ``model`` with the layers replaced."""
    from svdkernels.ops.rsvd_sharded import rsvd_sharded

    check_sharded(method, layers)
    scaling = alpha / rank
    built: dict[str, SVDLinear] = {}
    for (out_f, in_f, _, _), names in _shape_groups(layers).items():
        mesh = layers[names[0]].weight.device_mesh
        W = torch.stack([layers[n].weight.to_local().float() for n in names])  # [L, out_r, in]: local rows
        shape = (len(names), out_f, in_f)
        D = DTensor.from_local(W, mesh, [Shard(1)], run_check=False, shape=torch.Size(shape),
                               stride=(out_f * in_f, in_f, 1))
        U, S, Vh = rsvd_sharded(D, rank, oversample=oversample, n_iter=n_iter, seed=seed)
        inits = _FROM_SVD[method](U.to_local(), S.to_local(), Vh.to_local(), scaling, **method_kwargs)
        for name, init in zip(names, inits):
            built[name] = _build(layers[name], method, init, mesh)
    for name, layer in built.items():  # replaced only once every layer is built
        model = _replace(model, name, layer)
    return model
