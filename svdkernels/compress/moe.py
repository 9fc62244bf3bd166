"""``compress_experts``: merge and factorise the experts of a mixture-of-experts block.

Sub-MoE (Li et al. 2025, *Sub-MoE: efficient mixture-of-expert LLMs compression via
subspace expert merging*): experts are clustered by the cosine similarity of their
outputs on calibration tokens (K-means); each cluster's weights, concatenated along
their inputs ``[W₁ | W₂ | …]``, get one joint SVD, whose ``U`` (the output subspace) is
shared; the experts' ``V`` parts are merged weighted by how often the router picks
each expert. The router is kept and remapped: each original expert index points at
its cluster's merged expert (the top-k weights of experts merged together add up).

Works on Mixtral-style blocks (``transformers``' ``MixtralSparseMoeBlock``: a
``gate`` router returning ``(logits, top-k weights, top-k indices)`` and ``experts``
holding ``gate_up_proj [E, 2f, d]`` and ``down_proj [E, d, f]``).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from svdkernels.ops.rsvd import rsvd

MOE_METHODS = ("sub_moe", "svd")
_KINDS = ("gate_up_proj", "down_proj")

__all__ = ["MOE_METHODS", "LowRankExperts", "compress_experts", "kmeans_cosine"]


class LowRankExperts(nn.Module):
    """``C`` merged experts, each weight stored as factors ``A [C, out, r]``,
    ``B [C, r, in]`` (``W = A·B``) or dense ``[C, out, in]``, behind an
    ``expert_map [E]`` from the router's expert indices to merged experts. Called as
    Mixtral's experts are: ``(hidden [T, d], top_k_index [T, k], top_k_weights [T, k])``."""

    def __init__(self, weights: dict[str, tuple[torch.Tensor, ...]], expert_map: torch.Tensor, act_fn: Any) -> None:
        super().__init__()
        self.kinds = {}
        for kind in _KINDS:
            parts = weights[kind]
            self.kinds[kind] = len(parts)
            for i, t in enumerate(parts):
                self.register_parameter(f"{kind}_{'AB'[i] if len(parts) == 2 else 'W'}", nn.Parameter(t))
        self.register_buffer("expert_map", expert_map)
        self.num_experts = int(expert_map.max()) + 1
        self.act_fn = act_fn

    def _linear(self, kind: str, x: torch.Tensor, c: int) -> torch.Tensor:
        if self.kinds[kind] == 2:
            return F.linear(F.linear(x, getattr(self, f"{kind}_B")[c]), getattr(self, f"{kind}_A")[c])
        return F.linear(x, getattr(self, f"{kind}_W")[c])

    def weight(self, kind: str) -> torch.Tensor:
        """The dense weights ``[C, out, in]`` of one kind (``gate_up_proj``/``down_proj``)."""
        if self.kinds[kind] == 2:
            return getattr(self, f"{kind}_A") @ getattr(self, f"{kind}_B")
        return getattr(self, f"{kind}_W")

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        merged = self.expert_map[top_k_index]  # [T, k]
        for c in torch.unique(merged).tolist():
            tok, pos = torch.where(merged == c)
            x = hidden_states[tok]
            gate, up = self._linear("gate_up_proj", x, c).chunk(2, dim=-1)
            y = self._linear("down_proj", self.act_fn(gate) * up, c)
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out


def kmeans_cosine(V: torch.Tensor, k: int, *, iters: int = 50) -> torch.Tensor:
    """Spherical K-means of the rows of ``V [E, D]`` into ``k`` clusters (labels
    ``[E]`` int64), deterministic: farthest-point initialisation from row 0 (each new
    centre the row least similar to the centres so far), then Lloyd iterations on
    cosine similarity until the labels stop changing."""
    X = F.normalize(V.double(), dim=-1)
    centres = [0]
    sim = X @ X.T
    for _ in range(1, k):
        best = sim[:, centres].max(1).values
        best[centres] = math.inf
        centres.append(int(best.argmin()))
    C = X[centres]
    labels = torch.full((X.shape[0],), -1, dtype=torch.long)
    for _ in range(iters):
        new = (X @ C.T).argmax(1)
        if torch.equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = X[labels == j]
            if len(members):  # an emptied cluster keeps its centre
                C[j] = F.normalize(members.sum(0), dim=0)
    return labels


def _check(moe_block: nn.Module) -> tuple[nn.Module, nn.Module]:
    experts, gate = getattr(moe_block, "experts", None), getattr(moe_block, "gate", None)
    if experts is None or gate is None or not all(isinstance(getattr(experts, k, None), torch.Tensor) for k in _KINDS):
        raise TypeError("moe_block: expected a Mixtral-style block with .gate and .experts.gate_up_proj "
                        f"[E, 2f, d] / .experts.down_proj [E, d, f], got {type(moe_block).__name__}")
    for k in _KINDS:
        w = getattr(experts, k).detach()
        if not torch.isfinite(w).all():
            raise ValueError(f"moe_block.experts.{k}: expected finite values, got NaN or inf")
    return experts, gate


def _tokens(calib_batches: Iterable[Any], d: int) -> torch.Tensor:
    if calib_batches is None:
        raise ValueError("calib_batches: method 'sub_moe' needs hidden states [..., d] entering the block, got None")
    rows = []
    for b in calib_batches:
        if not isinstance(b, torch.Tensor) or b.shape[-1] != d:
            raise ValueError(f"calib_batches: expected tensors of hidden states [..., {d}], "
                             f"got {getattr(b, 'shape', type(b).__name__)}")
        rows.append(b.detach().reshape(-1, d))
    if not rows:
        raise ValueError("calib_batches: expected at least one batch, got an empty iterable")
    X = torch.cat(rows)
    if not torch.isfinite(X).all():
        raise ValueError("calib_batches: expected finite hidden states, got NaN or inf")
    return X


def _rank(keep: float, ratio: float, out: int, inp: int) -> Optional[int]:
    """Rank of one merged weight holding ``keep·ratio`` of a dense weight's
    parameters; None when that reaches the dense size (the weight is stored dense)."""
    r = int(keep * ratio * out * inp // (out + inp))
    if r * (out + inp) >= out * inp:
        return None
    return r


def compress_experts(
    moe_block: nn.Module,
    calib_batches: Optional[Iterable[torch.Tensor]] = None,
    *,
    method: str = "sub_moe",
    n_clusters: Optional[int] = None,
    keep: float = 0.5,
    seed: int = 0,
) -> nn.Module:
    """Replace ``moe_block.experts`` by :class:`LowRankExperts`, in place.

    ``keep`` is the fraction of the experts' parameters kept (router and everything
    outside the experts excluded). ``"sub_moe"``: ``n_clusters`` merged experts, each
    weight at rank ``⌊keep·(E/C)·out·in/(out + in)⌋`` (stored dense, the
    frequency-weighted merge, when that reaches the dense size). ``"svd"``: every
    expert kept (``n_clusters`` must be None or ``E``), each weight truncated at rank
    ``⌊keep·out·in/(out + in)⌋``; one batched :func:`svdkernels.rsvd` call per weight kind.

    Args:
        moe_block: a Mixtral-style block (module docstring).
        calib_batches: hidden states entering the block ``[..., d]`` (``sub_moe``).
        method: ``"sub_moe"`` or ``"svd"``.
        n_clusters: merged experts ``C``, ``1 ≤ C ≤ E``.
        keep: fraction in ``(0, 1]``.
        seed: seed of the randomized SVD.

    Returns:
        ``moe_block``; its experts' module gets ``labels`` ``[E]`` (the cluster of each
        original expert, as ``expert_map``) and ``frequency`` ``[E]`` (routing share).

    Raises:
        TypeError: not a Mixtral-style block; a malformed argument.
        ValueError: unknown ``method``; ``keep`` outside ``(0, 1]``; ``n_clusters``
            outside ``[1, E]``; ``calib_batches`` missing or of the wrong width for
            ``sub_moe``; a weight below rank 1; non-finite weights or inputs (checked
            before anything changes).
    """
    if method not in MOE_METHODS:
        raise ValueError(f"method: expected one of {MOE_METHODS}, got {method!r}")
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"keep: expected a float in (0, 1], got {type(keep).__name__}")
    if not math.isfinite(keep) or not 0 < keep <= 1:
        raise ValueError(f"keep: expected a fraction in (0, 1], got {keep}")
    experts, gate = _check(moe_block)
    E = experts.gate_up_proj.shape[0]
    if method == "svd":
        n_clusters = E if n_clusters is None else n_clusters
        if n_clusters != E:
            raise ValueError(f"n_clusters: method 'svd' keeps every expert: expected None or {E}, got {n_clusters}")
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int):
        raise TypeError(f"n_clusters: expected an int, got {type(n_clusters).__name__}")
    if not 1 <= n_clusters <= E:
        raise ValueError(f"n_clusters: expected 1 <= n_clusters <= {E} (experts), got {n_clusters}")
    Ws = {k: getattr(experts, k).detach() for k in _KINDS}
    ranks = {}
    for k, W in Ws.items():
        ranks[k] = _rank(keep, E / n_clusters, W.shape[1], W.shape[2])
        if ranks[k] is not None and ranks[k] < 1:
            raise ValueError(f"keep: {keep} leaves moe_block.experts.{k} ({W.shape[1]}x{W.shape[2]}) below rank 1")
    if method == "svd":
        labels = torch.arange(E)
        freq = torch.full((E,), 1.0 / E)
        weights = {k: _truncate(W, ranks[k], seed) for k, W in Ws.items()}
    else:
        X = _tokens(calib_batches, Ws["down_proj"].shape[1])
        labels, freq = _cluster(experts, gate, Ws, X, n_clusters)
        weights = {k: _merge(W, labels, freq, n_clusters, ranks[k], seed) for k, W in Ws.items()}
    dtype = Ws["down_proj"].dtype
    weights = {k: tuple(t.to(dtype).contiguous() for t in v) for k, v in weights.items()}
    new = LowRankExperts(weights, labels.to(Ws["down_proj"].device), experts.act_fn)
    new.labels, new.frequency = labels, freq
    moe_block.experts = new
    return moe_block


def _expert_outputs(Ws: dict[str, torch.Tensor], act_fn: Any, X: torch.Tensor) -> torch.Tensor:
    """Every expert's output on every token, ``[E, T, d]``."""
    gate, up = torch.einsum("td,efd->etf", X, Ws["gate_up_proj"]).chunk(2, dim=-1)
    return torch.einsum("etf,edf->etd", act_fn(gate) * up, Ws["down_proj"])


def _cluster(experts: nn.Module, gate: nn.Module, Ws: dict[str, torch.Tensor], X: torch.Tensor, k: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    E = Ws["down_proj"].shape[0]
    with torch.no_grad():
        idx = gate(X)[2]
        freq = torch.bincount(idx.flatten().cpu(), minlength=E).double()
        freq = freq / freq.sum()
        out = _expert_outputs(Ws, experts.act_fn, X)
    labels = kmeans_cosine(out.reshape(E, -1).cpu(), k)
    return labels, freq


def _merge(W: torch.Tensor, labels: torch.Tensor, freq: torch.Tensor, k: int, rank: Optional[int], seed: int
           ) -> tuple[torch.Tensor, ...]:
    """Per cluster: the joint SVD of ``[W_e1 | W_e2 | …]`` (shared ``U``), the ``V``
    parts averaged with the routing frequencies. Clusters of one size share a
    batched call. Dense (``rank`` None): the frequency-weighted average of the weights."""
    _, out, inp = W.shape
    members = [torch.nonzero(labels == c).flatten() for c in range(k)]
    weights = []
    for idx in members:
        f = freq[idx]
        weights.append(f / f.sum() if f.sum() > 0 else torch.full_like(f, 1.0 / len(idx)))
    if rank is None:
        return (torch.stack([(W[idx].double() * w.to(W.device)[:, None, None]).sum(0)
                             for idx, w in zip(members, weights)]).to(W.dtype),)
    A = W.new_empty(k, out, rank, dtype=torch.float32)
    B = W.new_empty(k, rank, inp, dtype=torch.float32)
    by_size: dict[int, list[int]] = {}
    for c, idx in enumerate(members):
        by_size.setdefault(len(idx), []).append(c)
    for size, cs in by_size.items():
        cat = torch.stack([torch.cat(list(W[members[c]].float()), dim=1) for c in cs])  # [n, out, size·in]
        r = min(rank, out, size * inp)
        U, S, Vh = rsvd(cat, r, seed=seed)
        for j, c in enumerate(cs):
            Vparts = Vh[j].reshape(r, size, inp)  # the experts' parts of Vᵀ
            Vm = (Vparts * weights[c].to(Vparts)[None, :, None]).sum(1)
            root = S[j].sqrt()
            A[c, :, :r] = U[j] * root
            B[c, :r] = root[:, None] * Vm
            if r < rank:  # more rank than the cluster has: pad with zeros
                A[c, :, r:] = 0
                B[c, r:] = 0
    return A, B


def _truncate(W: torch.Tensor, rank: Optional[int], seed: int) -> tuple[torch.Tensor, ...]:
    if rank is None:
        return (W.clone(),)
    U, S, Vh = rsvd(W.float(), rank, seed=seed)
    root = S.sqrt()
    return U * root[..., None, :], root[..., :, None] * Vh
