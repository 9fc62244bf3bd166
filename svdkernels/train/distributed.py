""":class:`~svdkernels.train.LowRankAdamW` beyond one process: FSDP2 and DDP.

**FSDP2** (``torch.distributed.fsdp.fully_shard``): parameters and gradients are
DTensors sharded by rows, ``Shard(0)``, on a 1-D mesh. A row-sharded gradient
``G_r [m_r, n]`` projected on its columns (the right side, ``R_r = G_r·Pᵀ [m_r, r]``,
``U_r = N_r·P``) makes the whole step local: the optimiser therefore projects every
sharded weight on the right (``side=None`` means right; ``side="left"``, which would
need an all-reduce of ``P·G [r, n]`` every step, is refused). The moments are DTensors
sharded like the weight (``[m, r]``, ``Shard(0)``), the bases are replicated. Only
the refresh communicates (Dion, Ahn et al. 2025, distributes its power iteration the
same way):

- ``rsvd`` from scratch: :func:`svdkernels.ops.rsvd_sharded.rsvd_sharded` (one ``l×l``
  all-reduce per orthonormalisation, the ``n×l`` sums of ``Gᵀ·Q``);
- ``rsvd`` warm-started (:func:`~svdkernels.train.projectors.warm_subspace` with a
  sum over the ranks): per pass one all-reduce of ``GᵀG·Q [n, l]``, then the
  Rayleigh-Ritz Gram ``l×l``;
- ``dct``: one all-reduce of the ``[k]`` column scores;
- ``svd``: one all-reduce of the Gram ``GᵀG [n, n]`` and its eigenvectors in float64
  (exact subspace; the signs are fixed by the largest entry, not LAPACK's);
- ``random``: no communication (seeded).

**DDP**: gradients are all-reduced before the step, identical on every rank. With
``process_group=`` the refresh work of the shape groups is divided among the ranks
(greedy by cost, the same plan on every rank) and each group's new bases are broadcast
from the rank that computed them, so no factorisation runs twice.

**Checkpoints**: :func:`sharded_state_dict` lays the optimiser state out as a flat dict
of tensors (DTensors for sharded parameters, no pickled objects) for
``torch.distributed.checkpoint.save``; the same call on a fresh optimiser is the
template ``dcp.load`` fills, then :func:`load_sharded_state_dict` installs it. The
checkpoint reloads on any world size, or in one process without FSDP.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def is_sharded(p: torch.Tensor) -> bool:
    # Without importing torch.distributed.tensor (seconds of import time, and absent from
    # torch builds without torch.distributed): no DTensor exists before something loads it.
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(p, mod.DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the same storage: in-place updates reach it), else ``t``."""
    return t.to_local() if is_sharded(t) else t


def check_sharded_param(p: DTensor, name: str, side: Optional[str]) -> None:
    """``ValueError`` unless ``p`` is row-sharded (``Shard(0)``) on a 1-D mesh, as FSDP2 leaves it."""
    from torch.distributed.tensor import Shard  # loaded: p is a DTensor

    mesh = p.device_mesh
    if mesh.ndim != 1 or len(p.placements) != 1 or p.placements[0] != Shard(0):
        raise ValueError(f"parameter {name}: expected a DTensor sharded by rows (Shard(0), as fully_shard "
                         f"leaves it) on a 1-D mesh, got placements {tuple(p.placements)} on a "
                         f"{mesh.ndim}-D mesh")
    if side == "left":
        raise ValueError(f"parameter {name}: expected side None or 'right' for a row-sharded (FSDP2) weight "
                         f"(the right side keeps the step local), got 'left'")


def group_of(p: DTensor) -> dist.ProcessGroup:
    return p.device_mesh.get_group()


def zeros_like_rows(p: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 zeros of global ``shape`` whose first dim is split as ``p``'s rows: a plain
    tensor for a plain ``p``, a ``Shard(0)`` DTensor on ``p``'s mesh for a sharded one."""
    if not is_sharded(p):
        return torch.zeros(shape, dtype=torch.float32, device=p.device)
    from torch.distributed.tensor import DTensor, Shard  # loaded: p is a DTensor

    rows = p.to_local().shape[0]
    t = torch.zeros((rows, *shape[1:]), dtype=torch.float32, device=p.to_local().device)
    stride = tuple(torch.empty(shape, device="meta").stride())
    return DTensor.from_local(t, p.device_mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                              stride=stride)


def replicated(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` (the same on every rank) as a replicated DTensor on ``p``'s mesh, or ``t`` itself."""
    if not is_sharded(p):
        return t
    from torch.distributed.tensor import DTensor, Replicate  # loaded: p is a DTensor

    return DTensor.from_local(t, p.device_mesh, [Replicate()], run_check=False)


def row_offset(p: DTensor) -> int:
    """Index of the first global row this rank holds (torch.chunk's split, as FSDP2's)."""
    m, world, rank = p.shape[0], p.device_mesh.size(), p.device_mesh.get_local_rank()
    chunk = -(-m // world)
    return min(rank * chunk, m)


def allreduce(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    t = t.contiguous()
    dist.all_reduce(t, group=group)
    return t


# ---------------------------------------------------------------------- FSDP2 refresh


def sharded_svd_bases(G: torch.Tensor, rank: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Exact top-``rank`` right singular vectors ``[b, r, n]`` of row-sharded ``G`` (local
    ``[b, m_r, n]``): eigenvectors of the all-reduced float64 Gram ``GᵀG``, each signed so
    that its largest-magnitude entry is positive (a deterministic choice; LAPACK's SVD
    signs, which the single-process ``svd`` projector keeps, are arbitrary)."""
    Gd = G.double()
    _, vecs = torch.linalg.eigh(allreduce(Gd.mT @ Gd, group))
    V = vecs.flip(-1)[..., :rank]  # [b, n, r], largest first
    sign = torch.gather(V, -2, V.abs().argmax(-2, keepdim=True)).sign()
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (V * sign).mT.to(G.dtype).contiguous()


def sharded_rsvd_bases(G: torch.Tensor, m: int, rank: int, *, seed: int, p: DTensor) -> torch.Tensor:
    """Right bases ``[b, r, n]`` of row-sharded ``G`` by the sharded rsvd (the single-process
    projector's ``oversample=10, n_iter=2``); ``m`` the global row count, ``p`` a
    parameter of the batch (its mesh)."""
    from torch.distributed.tensor import DTensor, Shard  # loaded: p is a DTensor

    from svdkernels.ops.rsvd_sharded import rsvd_sharded  # only when a sharded refresh runs

    b, _, n = G.shape
    A = DTensor.from_local(G, p.device_mesh, [Shard(1)], run_check=False, shape=torch.Size((b, m, n)),
                           stride=(m * n, n, 1))
    _, _, Vh = rsvd_sharded(A, rank, oversample=10, n_iter=2, seed=seed)
    return Vh.to_local().contiguous()


def sharded_dct_indices(G: torch.Tensor, rank: int, group: dist.ProcessGroup, dct: torch.Tensor) -> torch.Tensor:
    """:func:`~svdkernels.train.projectors.dct_indices` (right side) of row-sharded ``G``:
    the column scores ``Σ_rows |G·Qᵀ|`` summed over the ranks (one all-reduce of ``[b, n]``)."""
    scores = allreduce((G @ dct.T).abs().sum(-2), group)
    return scores.topk(rank, dim=-1).indices


# ---------------------------------------------------------------------- DDP refresh plan


def plan_owners(costs: list[float], world: int) -> list[int]:
    """The rank that refreshes each shape group: greedy longest-first onto the least loaded
    rank (ties to the lower rank), a pure function of the costs, so every rank agrees."""
    load = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += costs[i]
    return owners


def broadcast_from(t: Optional[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                   src_rank: int, group: dist.ProcessGroup) -> torch.Tensor:
    """``t`` from group rank ``src_rank`` to every rank (others pass ``None``)."""
    if t is None:
        t = torch.empty(shape, dtype=dtype, device=device)
    else:
        t = t.contiguous()
    dist.broadcast(t, group=group, group_src=src_rank)
    return t


# ---------------------------------------------------------------------- checkpoints

_META = ("has_state", "step", "next_refresh", "refreshes", "gap", "basis_seed", "n_cosines")
_META_INT = ("step", "next_refresh", "refreshes", "gap", "basis_seed")


def _param_names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def sharded_state_dict(optimizer: Any, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state of a :class:`~svdkernels.train.LowRankAdamW` as a flat dict of tensors
    keyed ``"<parameter name>.<entry>"`` for ``torch.distributed.checkpoint``.

    Entries: ``exp_avg``, ``exp_avg_sq`` (sharded like the parameter), the basis
    (``basis`` and for int4 ``basis_scale``/``basis_zero``, or ``dct_index``; replicated),
    ``meta`` int64 ``[7]`` (has state, step, next refresh, refreshes, gap, random-basis
    seed, number of cosines) and ``cosines`` float64 ``[5]`` (Q-GaLore's window). A
    parameter without state yet gets zeros, so the dict of a fresh optimiser is the
    template ``dcp.load`` fills in place. Returns live tensors: save it at once.
    """
    from svdkernels.train.optim import COS_WINDOW

    names = _param_names(model)
    out: dict[str, torch.Tensor] = {}
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            if id(p) not in names:
                raise ValueError(f"model: expected the module whose parameters the optimizer holds, got one "
                                 f"without parameter {optimizer._name(group, gi, pi, p)}")
            key = names[id(p)]
            st = optimizer.state.get(p, {})
            meta = torch.tensor([1 if "exp_avg" in st else 0] + [int(st.get(k, -1)) for k in _META_INT]
                                + [len(st.get("cosines", []))], dtype=torch.int64)
            cos = torch.zeros(COS_WINDOW, dtype=torch.float64)
            cos[: len(st.get("cosines", []))] = torch.tensor(st.get("cosines", []), dtype=torch.float64)
            out[f"{key}.meta"] = meta
            out[f"{key}.cosines"] = cos
            for entry in optimizer.state_entries(group, p):
                if entry in st:
                    out[f"{key}.{entry}"] = st[entry]
                else:
                    out[f"{key}.{entry}"] = optimizer.empty_state(group, p, entry)
    return out


def load_sharded_state_dict(optimizer: Any, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Install a state that ``dcp.load`` filled (into :func:`sharded_state_dict`'s template
    of this optimiser): ``ValueError`` naming the first missing entry, nothing changed."""
    names = _param_names(model)
    todo = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            key = names.get(id(p))
            need = ["meta", "cosines"] + list(optimizer.state_entries(group, p))
            for entry in need:
                if f"{key}.{entry}" not in state:
                    raise ValueError(f"state: expected entry {key}.{entry!s} (from sharded_state_dict), missing")
            todo.append((group, p, key))
    for group, p, key in todo:
        meta = dict(zip(_META, state[f"{key}.meta"].tolist()))
        if not meta["has_state"]:
            optimizer.state.pop(p, None)
            continue
        st: dict[str, Any] = {}
        for k in _META_INT:
            if meta[k] >= 0:
                st[k] = int(meta[k])
        if meta["n_cosines"] > 0:
            st["cosines"] = state[f"{key}.cosines"][: meta["n_cosines"]].tolist()
        for entry in optimizer.state_entries(group, p):
            t = state[f"{key}.{entry}"]
            st[entry] = t if is_sharded(t) else t.to(p.device, copy=True)
        if group["lowrank"] and group["projector"] != "random":
            st.pop("basis_seed", None)
        optimizer.state[p] = st
    optimizer._cache.clear()
