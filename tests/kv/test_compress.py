"""xkv_compress: exact at full rank, optimal truncation, shared latents, per-sequence bases, energy."""
import pytest
import torch

from svdkernels.kv import XKVGroup, xkv_compress
from svdkernels.kv.compress import energy_rank
from svdkernels.testing.errors import assert_raises_naming


def layers(L=4, B=2, T=40, n=12, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, n, generator=g).to(dtype) for _ in range(L)]


@pytest.mark.parametrize("G", [1, 2, 3])
def test_full_rank_is_exact_and_groups_share_one_latent(G):
    keys, values = layers(L=4), layers(L=4, seed=1)
    groups = xkv_compress(keys, values, group_size=G)
    assert [grp.layers for grp in groups] == [tuple(range(s, min(s + G, 4))) for s in range(0, 4, G)]
    for grp in groups:
        assert isinstance(grp, XKVGroup)
        rank = min(40, 12 * len(grp.layers))
        assert grp.k_latent.shape == (2, 40, rank) and grp.v_latent.shape == (2, 40, rank)
        for i, layer in enumerate(grp.layers):
            assert grp.k_bases[i].shape == (2, rank, 12)
            torch.testing.assert_close(grp.keys(i), keys[layer], rtol=1e-4, atol=1e-4)  # fp32 SVD of [40, 12G]
            torch.testing.assert_close(grp.values(i), values[layer], rtol=1e-4, atol=1e-4)


def test_truncation_reaches_the_eckart_young_error():
    # Adjacent layers sharing a subspace (xKV's observation) plus noise.
    g = torch.Generator().manual_seed(2)
    B, T, n, r = 2, 96, 16, 6
    shared = torch.randn(B, T, r, generator=g)
    keys = [shared @ torch.randn(r, n, generator=g) + 0.05 * torch.randn(B, T, n, generator=g) for _ in range(3)]
    groups = xkv_compress(keys, keys, group_size=3, rank_k=r, rank_v=r)
    A = torch.cat(keys, dim=-1).double()
    S = torch.linalg.svdvals(A)
    opt = S[:, r:].square().sum(-1).sqrt()
    err = (groups[0].k_latent.double() @ torch.cat(groups[0].k_bases, -1).double() - A).norm(dim=(1, 2))
    assert ((err / opt) < 1.01).all() and ((err / opt) > 1 - 1e-4).all(), err / opt
    torch.testing.assert_close(groups[0].k_singular_values.double(), S[:, :r], rtol=1e-4, atol=1e-4)
    # One latent of rank r serves three layers: 3x fewer latent floats than per-layer rank r.
    assert groups[0].k_latent.shape[-1] == r


def test_bases_are_per_sequence():
    # Two sequences in different 3-D subspaces: rank 3 is exact for each only with its own basis.
    g = torch.Generator().manual_seed(3)
    keys = [torch.stack([torch.randn(30, 3, generator=g) @ torch.randn(3, 10, generator=g) for _ in range(2)])]
    (grp,) = xkv_compress(keys, keys, group_size=1, rank_k=3, rank_v=3)
    assert grp.k_bases[0].shape == (2, 3, 10)
    torch.testing.assert_close(grp.keys(0), keys[0], rtol=1e-4, atol=1e-4)
    overlap = grp.k_bases[0][0] @ grp.k_bases[0][1].T
    assert overlap.norm() < 2.9  # distinct subspaces (identical ones would give sqrt(3))


def test_energy_picks_the_smallest_rank_keeping_it():
    g = torch.Generator().manual_seed(4)
    U, _ = torch.linalg.qr(torch.randn(50, 20, generator=g))
    V, _ = torch.linalg.qr(torch.randn(20, 20, generator=g))
    S = torch.tensor([10.0, 5, 3, 1] + [0.01] * 16)
    A = (U * S) @ V.T
    keys = [A.unsqueeze(0)]
    (grp,) = xkv_compress(keys, keys, group_size=1, energy=0.99)
    # 100 + 25 + 9 = 134 of 135.0016: 3 components keep 99.26%, 2 keep 92.6%.
    assert grp.k_latent.shape[-1] == 3
    (capped,) = xkv_compress(keys, keys, group_size=1, energy=0.99, rank_k=2)
    assert capped.k_latent.shape[-1] == 2
    assert energy_rank(S.unsqueeze(0), S.square().sum().unsqueeze(0), 1.0) == 20


def test_low_precision_keeps_its_dtype():
    keys = layers(L=2, dtype=torch.bfloat16)
    (grp,) = xkv_compress(keys, keys, group_size=2, rank_k=8, rank_v=8)
    assert grp.k_latent.dtype == torch.bfloat16 and grp.k_bases[0].dtype == torch.bfloat16
    assert grp.nbytes == 2 * (2 * 40 * 8 + 2 * 2 * 8 * 12) * 2


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda: xkv_compress(layers(L=2), layers(L=3)), ValueError, ["values", "2 layers", "3 layers"]),
        (lambda: xkv_compress(layers(L=2), layers(L=2, T=5)), ValueError, ["values", "[2, 40]", "[2, 5]"]),
        (lambda: xkv_compress(torch.randn(2, 3, 4), layers(L=1)), TypeError, ["keys", "list"]),
        (lambda: xkv_compress([torch.randn(3, 4)], layers(L=1)), ValueError, ["keys[0]", "[B, T, Hkv*d]", "(3, 4)"]),
        (lambda: xkv_compress(layers(L=2) + [torch.randn(1, 40, 12)], layers(L=3)), ValueError,
         ["keys[2]", "[2, 40]", "[1, 40]"]),
        (lambda: xkv_compress([torch.randn(1, 4, 4, dtype=torch.float64)], layers(L=1)), TypeError,
         ["keys[0]", "float32", "torch.float64"]),
        (lambda: xkv_compress(layers(L=2), layers(L=2), group_size=0), ValueError, ["group_size", ">= 1", "0"]),
        (lambda: xkv_compress(layers(L=2), layers(L=2), rank_k=0), ValueError, ["rank_k", ">= 1", "0"]),
        (lambda: xkv_compress(layers(L=2), layers(L=2), energy=1.5), ValueError, ["energy", "(0, 1]", "1.5"]),
    ],
    ids=["layer-count", "value-shape", "not-a-list", "2d-layer", "batch-mismatch", "float64", "group-size",
         "rank", "energy"],
)
def test_bad_input_names_the_argument(call, exc, words):
    assert_raises_naming(call, exc, words)
