"""compress_experts on a Mixtral block built from a transformers MixtralConfig
(nothing downloaded): planted structure recovered, router remapping, bad input."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from svdkernels.compress.moe import LowRankExperts, compress_experts, kmeans_cosine

pytestmark = pytest.mark.usefixtures("one_thread")

E, D, FF, R0 = 8, 32, 48, 4
PLANTED = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1])  # the cluster of each expert


def _block(delta: float, seed: int = 0) -> nn.Module:
    """Experts = their cluster's rank-R0 base + ``delta``-sized deltas."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=D, intermediate_size=FF, num_local_experts=E, num_experts_per_tok=2)
    block = MixtralSparseMoeBlock(cfg).eval()
    g = torch.Generator().manual_seed(seed)

    def low_rank(out: int, inp: int) -> torch.Tensor:
        return torch.randn(out, R0, generator=g) @ torch.randn(R0, inp, generator=g) / math.sqrt(R0 * inp)

    with torch.no_grad():
        block.gate.weight.copy_(torch.randn(E, D, generator=g))
        for name, (out, inp) in (("gate_up_proj", (2 * FF, D)), ("down_proj", (D, FF))):
            base = torch.stack([low_rank(out, inp) for _ in range(2)])
            w = base[PLANTED] + delta * torch.randn(E, out, inp, generator=g) / math.sqrt(inp)
            getattr(block.experts, name).copy_(w)
    return block


def _hidden(seed: int = 1, n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 16, D, generator=g) for _ in range(n)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    return all(bool((a == a[i]).eq(b == b[i]).all()) for i in range(len(a)))


def test_planted_clusters_and_bases_are_recovered_exactly() -> None:
    block = _block(delta=0.0)
    x = torch.cat(_hidden(2))
    with torch.no_grad():
        want = block(x)
    # keep 0.1: per merged weight rank ⌊0.1·4·96·32/128⌋ = 9 >= R0, so nothing is lost.
    compress_experts(block, _hidden(), n_clusters=2, keep=0.1)
    ex = block.experts
    assert isinstance(ex, LowRankExperts) and ex.num_experts == 2
    assert _same_partition(ex.labels, PLANTED)
    with torch.no_grad():
        got = block(x)
    assert _rel(got, want) < 1e-5  # float32 rounding only


def test_small_deltas_cost_little_and_beat_per_expert_svd() -> None:
    base = _block(delta=1e-2)
    x = torch.cat(_hidden(2))
    with torch.no_grad():
        want = base(x)
    import copy

    merged = compress_experts(copy.deepcopy(base), _hidden(), n_clusters=2, keep=0.1)
    plain = compress_experts(copy.deepcopy(base), method="svd", keep=0.1)  # rank ⌊0.1·96·32/128⌋ = 2 per expert
    assert _same_partition(merged.experts.labels, PLANTED)
    with torch.no_grad():
        err_merged, err_plain = _rel(merged(x), want), _rel(plain(x), want)
    assert err_merged < 0.05, err_merged
    assert err_merged < err_plain / 5, (err_merged, err_plain)
    # Parameters: 2 merged experts at rank 9 against 8 at rank 2 — both within keep.
    dense = sum(getattr(base.experts, k).numel() for k in ("gate_up_proj", "down_proj"))
    for blk in (merged, plain):
        kept = sum(p.numel() for p in blk.experts.parameters())
        assert kept <= 0.1 * dense, kept


def test_router_is_remapped_onto_merged_experts() -> None:
    block = _block(delta=0.05, seed=3)
    compress_experts(block, _hidden(), n_clusters=3, keep=0.5)
    ex = block.experts
    assert torch.equal(ex.expert_map, ex.labels)
    x = torch.cat(_hidden(5)).reshape(-1, D)
    with torch.no_grad():
        _, w, idx = block.gate(x)
        got = block(x.reshape(1, -1, D)).reshape(-1, D)
        gu, dn = ex.weight("gate_up_proj"), ex.weight("down_proj")
        want = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for j in range(idx.shape[1]):
                c = int(ex.labels[idx[t, j]])
                g, u = (gu[c] @ x[t]).chunk(2)
                want[t] += w[t, j] * (dn[c] @ (ex.act_fn(g) * u))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_kmeans_cosine_is_deterministic_and_scale_free() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 20, generator=g)
    truth = torch.tensor([0, 1, 2, 0, 1, 2, 2, 0])
    V = centres[truth] * torch.rand(8, 1, generator=g) * 10 + 0.01 * torch.randn(8, 20, generator=g)
    labels = kmeans_cosine(V, 3)
    assert _same_partition(labels, truth)
    assert torch.equal(labels, kmeans_cosine(V, 3))


def test_bad_input() -> None:
    block = _block(0.0)
    with pytest.raises(ValueError, match="n_clusters"):
        compress_experts(block, _hidden(), n_clusters=0)
    with pytest.raises(ValueError, match="n_clusters"):
        compress_experts(block, _hidden(), n_clusters=E + 1)
    with pytest.raises(ValueError, match="n_clusters"):
        compress_experts(block, method="svd", n_clusters=2)
    with pytest.raises(ValueError, match="keep"):
        compress_experts(block, _hidden(), n_clusters=2, keep=0)
    with pytest.raises(ValueError, match="method"):
        compress_experts(block, _hidden(), method="d2_moe", n_clusters=2)
    with pytest.raises(ValueError, match="calib_batches"):
        compress_experts(block, None, n_clusters=2)
    with pytest.raises(ValueError, match="calib_batches"):
        compress_experts(block, [torch.randn(3, D + 1)], n_clusters=2)
    with pytest.raises(TypeError, match="moe_block"):
        compress_experts(nn.Linear(4, 4), _hidden(), n_clusters=2)
    with pytest.raises(ValueError, match="keep"):
        compress_experts(block, _hidden(), n_clusters=E, keep=0.001)
    with torch.no_grad():
        block.experts.down_proj[3, 0, 0] = math.nan
    with pytest.raises(ValueError, match="down_proj"):
        compress_experts(block, _hidden(), n_clusters=2)
    assert not isinstance(block.experts, LowRankExperts)
