"""LOST: low-rank plus channel-wise sparse pre-training.

LOST ("Low-rank and Sparse Pre-training for LLMs", Li et al. 2025) trains every
projection as ``W = B·A + S``: a low-rank part from the top-``r`` SVD of the weight
(``B = U_r·√Σ_r``, ``A = √Σ_r·V_rᵀ``) and a sparse part ``S`` that holds whole *input
channels* (columns of ``W``) chosen from the energy of the components after ``r``
(the column norms of ``W − B·A``). The sparse part is initialised with those columns
of the residual, so ``B·A + S`` is the best weight of that structure the SVD gives
(with ``rank`` and ``sparse_channels`` covering the whole weight it is exact).

:class:`LowRankSparseLinear` never forms the dense ``W``: ``y = (x·Aᵀ)·Bᵀ + x[..., idx]·Sᵀ + b``,
two thin products and an index-select (its backward is an index-add into the input
gradient, autograd's).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from svdkernels.quant.model import Targets, select_layers
from svdkernels.train.checks import check_finite_weights


def _check_int(name: str, value: object, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}: expected an int {rng}, got {value}")
    return value


class LowRankSparseLinear(nn.Module):
    """``y = x·(B·A + S_full)ᵀ + bias`` with ``S_full`` nonzero only in ``channels`` columns.

    Parameters: ``B [out, r]``, ``A [r, in]``, ``S [out, c]``, ``bias [out]`` (optional);
    buffer ``channels [c]`` int64 (distinct input-channel indices). Parameter count
    ``r·(in + out) + out·c`` (+ bias).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, sparse_channels: int, *,
                 bias: bool = True, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        _check_int("in_features", in_features, 1)
        _check_int("out_features", out_features, 1)
        _check_int("rank", rank, 1, min(in_features, out_features))
        _check_int("sparse_channels", sparse_channels, 0, in_features)
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.B = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.A = nn.Parameter(torch.zeros(rank, in_features, **kw))
        self.S = nn.Parameter(torch.zeros(out_features, sparse_channels, **kw))
        self.register_buffer("channels", torch.arange(sparse_channels, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def sparse_channels(self) -> int:
        return self.S.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in] -> [..., out]``."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected last dimension {self.in_features}, got shape {tuple(x.shape)}")
        y = (x @ self.A.mT) @ self.B.mT
        if self.sparse_channels:
            y = y + x.index_select(-1, self.channels) @ self.S.mT
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> torch.Tensor:
        """The dense ``W = B·A + S_full [out, in]`` (for merging and checks; training never forms it)."""
        W = self.B @ self.A
        return W.index_add(1, self.channels, self.S)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the same function."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.A.device, dtype=self.A.dtype)
        out.weight.copy_(self.dense_weight())
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        ch = state_dict.get(prefix + "channels")
        if ch is not None:
            c = self.sparse_channels
            if ch.dtype != torch.int64 or ch.dim() != 1 or ch.numel() != c:
                raise ValueError(f"{prefix}channels: expected int64 [{c}], got {ch.dtype} {tuple(ch.shape)}")
            if c and (int(ch.min()) < 0 or int(ch.max()) >= self.in_features or ch.unique().numel() != c):
                raise ValueError(f"{prefix}channels: expected {c} distinct indices in [0, {self.in_features}), "
                                 f"got {ch.tolist()}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"sparse_channels={self.sparse_channels}, bias={self.bias is not None}")


def lowrank_rank_at_same_params(in_features: int, out_features: int, rank: int, sparse_channels: int) -> int:
    """The rank of a plain low-rank ``B·A`` with the parameter count of LOST's
    ``(rank, sparse_channels)``: ``rank + ⌊out·c / (in + out)⌋``."""
    return rank + (out_features * sparse_channels) // (in_features + out_features)


@torch.no_grad()
def lost_init(model: nn.Module, rank: int, sparse_channels: int, *, targets: Targets = None) -> dict[str, LowRankSparseLinear]:
    """Replace the target ``nn.Linear`` layers of ``model`` by :class:`LowRankSparseLinear`, in place.

    Each weight ``W [m, n]`` is split by its SVD (one batched ``torch.linalg.svd`` per
    shape group): ``B = U_r√Σ_r``, ``A = √Σ_r V_rᵀ``; the ``sparse_channels`` input
    channels with the largest column norms of the residual ``W − B·A`` go to ``S``
    (initialised with those residual columns). ``sparse_channels = 0`` is low rank alone.

    Args:
        model: any module (a bare ``nn.Linear`` is not replaced: wrap it in a container).
        rank: ``1 <= rank <= min(m, n)`` for every target.
        sparse_channels: ``0 <= sparse_channels <= n`` for every target.
        targets: ``None`` (all ``nn.Linear``), a regex or a list of names / suffixes.

    Returns:
        ``{name: layer}`` of the new layers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    layers = select_layers(model, targets)
    if "" in layers:
        raise TypeError("model: expected a module containing nn.Linear layers, got a bare nn.Linear "
                        "(wrap it, e.g. in nn.Sequential)")
    _check_int("rank", rank, 1)
    _check_int("sparse_channels", sparse_channels, 0)
    for name, layer in layers.items():
        m, n = layer.weight.shape
        if rank > min(m, n):
            raise ValueError(f"rank: expected <= min(out, in) = {min(m, n)} for layer {name!r}, got {rank}")
        if sparse_channels > n:
            raise ValueError(f"sparse_channels: expected <= in_features = {n} for layer {name!r}, got {sparse_channels}")
    check_finite_weights(layers)
    groups: dict[tuple, list[str]] = {}
    for name, layer in layers.items():
        w = layer.weight
        groups.setdefault((tuple(w.shape), w.dtype, w.device), []).append(name)
    new: dict[str, LowRankSparseLinear] = {}
    modules = dict(model.named_modules())
    for (shape, dtype, device), names in groups.items():
        W = torch.stack([layers[n].weight.detach().float() for n in names])
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        root = S[:, :rank].sqrt()
        Bs = U[..., :rank] * root[:, None, :]  # [G, m, r]
        As = root[..., None] * Vh[:, :rank]  # [G, r, n]
        R = W - Bs @ As  # residual: the components after r
        energy = R.norm(dim=1)  # [G, n] column norms
        idx = energy.topk(sparse_channels, dim=-1).indices.sort(-1).values if sparse_channels else None
        for i, name in enumerate(names):
            old = layers[name]
            layer = LowRankSparseLinear(shape[1], shape[0], rank, sparse_channels, bias=old.bias is not None,
                                        device=device, dtype=dtype)
            layer.B.copy_(Bs[i])
            layer.A.copy_(As[i])
            if idx is not None:
                layer.channels.copy_(idx[i])
                layer.S.copy_(R[i][:, idx[i]])
            if old.bias is not None:
                layer.bias.copy_(old.bias)
            parent, _, attr = name.rpartition(".")
            setattr(modules[parent], attr, layer)
            new[name] = layer
    return new


__all__ = ["LowRankSparseLinear", "lost_init", "lowrank_rank_at_same_params"]
