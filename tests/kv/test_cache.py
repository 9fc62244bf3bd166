"""LowRankKVCache: lossless at full rank through prefill, compression, appends and window overflow."""
import math

import pytest
import torch

import svdkernels
from svdkernels.kv import LowRankKVCache
from svdkernels.ops.lowrank_attention import dense_attention
from svdkernels.testing.errors import assert_raises_naming

B, HQ, HKV, D = 2, 4, 2, 8
N = HKV * D
ROPE = svdkernels.RoPE(theta=1000.0)


class Stream:
    """Random pre-RoPE keys, values and post-RoPE queries for L layers, kept in full for the oracle."""

    def __init__(self, L: int, seed: int = 0, rope=ROPE):
        self.g = torch.Generator().manual_seed(seed)
        self.L, self.rope = L, rope
        self.keys = [torch.empty(B, 0, N) for _ in range(L)]
        self.values = [torch.empty(B, 0, N) for _ in range(L)]

    def step(self, S: int):
        new = []
        for layer in range(self.L):
            k, v = torch.randn(B, S, N, generator=self.g), torch.randn(B, S, N, generator=self.g)
            self.keys[layer] = torch.cat([self.keys[layer], k], 1)
            self.values[layer] = torch.cat([self.values[layer], v], 1)
            new.append((k, v, torch.randn(B, HQ, S, D, generator=self.g)))
        return new

    def dense(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        k = self.keys[layer].view(B, -1, HKV, D).transpose(1, 2)
        v = self.values[layer].view(B, -1, HKV, D).transpose(1, 2)
        return dense_attention(q, k, v, rope=self.rope, causal=True)[0]


def run(cache: LowRankKVCache, stream: Stream, steps, check=True, tol=2e-5):
    """Prefill then append ``steps`` (token counts), attending at every layer like a forward pass."""
    errors = []
    for i, S in enumerate(steps):
        for layer, (k, v, q) in enumerate(stream.step(S)):
            (cache.prefill if i == 0 else cache.append)(layer, k, v)
            out = cache.attend(layer, q)
            want = stream.dense(layer, q)
            errors.append(float((out - want).norm() / want.norm()))
            if check:
                torch.testing.assert_close(out, want, rtol=tol, atol=tol)  # fp32 SVD at full rank
    return errors


@pytest.mark.parametrize("G,window", [(2, 4), (1, 0), (3, 6)], ids=["G2-W4", "G1-W0", "G3-W6"])
def test_full_rank_equals_dense_attention(G, window):
    # The prompt has more tokens than G·Hkv·d, so the full-rank bases span every key.
    L, T = 4, 3 * N + 5
    cache = LowRankKVCache(L, group_size=G, window=window, rope=ROPE)
    stream = Stream(L)
    run(cache, stream, [T, 1, 1, 3, 1, 2])
    total = T + 8
    for layer in range(L):
        assert cache.seq_length(layer) == total
        # The window holds `window` tokens, or the last step's when that is larger.
        assert cache.window_length(layer) == max(window, 2)


def test_prefill_attention_is_exact_and_compression_waits_for_the_first_append():
    cache = LowRankKVCache(2, group_size=2, rank_k=3, rank_v=3, window=2, rope=ROPE)
    stream = Stream(2)
    run(cache, stream, [20], tol=1e-6)  # nothing compressed yet: dense attention
    assert cache.window_length(0) == 20 and cache.nbytes() == cache.dense_nbytes()
    cache.compress()
    assert cache.window_length(0) == 2 and cache.seq_length(1) == 20
    assert cache.nbytes() < cache.dense_nbytes()


class SharedLatentStream(Stream):
    """xKV's premise: each token's keys (and values) in every layer of the group are one
    rank-6 latent times a per-layer basis, plus a little noise."""

    def __init__(self, L: int, seed: int = 0):
        super().__init__(L, seed, rope=None)
        self.bases = [torch.randn(6, N, generator=self.g) for _ in range(2 * L)]

    def step(self, S: int):
        new = super().step(S)
        for i, store in enumerate((self.keys, self.values)):
            c = torch.randn(B, S, 6, generator=self.g)
            for layer in range(self.L):
                noise = 0.01 * torch.randn(B, S, N, generator=self.g)
                store[layer][:, -S:] = c @ self.bases[2 * layer + i] + noise
        return [(self.keys[l][:, -S:], self.values[l][:, -S:], q) for l, (_, _, q) in enumerate(new)]


def test_low_rank_is_approximate_and_smaller():
    cache = LowRankKVCache(2, group_size=2, rank_k=6, rank_v=6, window=8, rope=None)
    errors = run(cache, SharedLatentStream(2), [200, 1, 1, 1], check=False)
    assert max(errors) < 0.02, errors
    # Per token 12 latent floats against 2·2·16·2 = 128 dense ones; bases and window cost the rest.
    assert cache.nbytes() < cache.dense_nbytes() / 4


def test_energy_ranks_and_reset():
    cache = LowRankKVCache(2, group_size=2, energy=0.5, window=1, rope=ROPE)
    run(cache, Stream(2), [40, 1], check=False)
    assert cache.seq_length(0) == 41
    cache.reset()
    assert cache.seq_length(0) == 0 and cache.nbytes() == 0


def test_a_multi_token_step_never_projects_its_own_tokens():
    # window 0: every older token is a latent, yet a 3-token step attends causally among its own.
    cache = LowRankKVCache(2, group_size=1, window=0, rope=ROPE)
    stream = Stream(2)
    run(cache, stream, [N + 2, 3, 1])
    assert cache.window_length(0) == 1


def kv(S=4, n=N):
    return torch.randn(B, S, n), torch.randn(B, S, n)


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda: LowRankKVCache(0), ValueError, ["num_layers", ">= 1", "0"]),
        (lambda: LowRankKVCache(2, window=-1), ValueError, ["window", ">= 0", "-1"]),
        (lambda: LowRankKVCache(2, rank_k=0), ValueError, ["rank_k", ">= 1", "0"]),
        (lambda: LowRankKVCache(2, rope="neox"), TypeError, ["rope", "RoPE", "str"]),
        (lambda: LowRankKVCache(2).append(0, *kv()), ValueError, ["layer_idx", "empty", "prefill"]),
        (lambda: LowRankKVCache(2).prefill(2, *kv()), ValueError, ["layer_idx", "[0, 2)", "2"]),
        (lambda: _twice(), ValueError, ["layer_idx", "already holds 4 tokens"]),
        (lambda: LowRankKVCache(2).prefill(0, torch.randn(B, 4, N), torch.randn(B, 5, N)), ValueError,
         ["values", "[2, 4]", "[2, 5]"]),
        (lambda: _other_batch(), ValueError, ["keys", "batch 2", "3"]),
        (lambda: _attend(torch.randn(B, HQ, 5, D)), ValueError, ["q", "1 <= Sq <= 4", "(2, 4, 5, 8)"]),
        (lambda: LowRankKVCache(2).attend(1, torch.randn(B, HQ, 1, D)), ValueError, ["layer_idx", "empty"]),
        (lambda: _append_before_group_prefilled(), ValueError, ["group_idx", "layers [1]", "prefill"]),
    ],
    ids=["layers", "window", "rank", "rope", "append-empty", "layer-range", "prefill-twice", "values-shape",
         "batch", "q-too-long", "attend-empty", "group-incomplete"],
)
def test_bad_input_names_the_argument(call, exc, words):
    assert_raises_naming(call, exc, words)


def _twice():
    cache = LowRankKVCache(2)
    cache.prefill(0, *kv())
    cache.prefill(0, *kv())


def _other_batch():
    cache = LowRankKVCache(2)
    cache.prefill(0, *kv())
    cache.prefill(1, torch.randn(3, 4, N), torch.randn(3, 4, N))


def _attend(q):
    cache = LowRankKVCache(2)
    cache.prefill(0, *kv())
    cache.attend(0, q)


def _append_before_group_prefilled():
    cache = LowRankKVCache(2, group_size=2)
    cache.prefill(0, *kv())
    cache.append(0, *kv(1))


def test_attend_matches_lowrank_attention_with_tail_positions():
    # After compression the latents are positions 0..n-1 and the window follows: check the
    # bookkeeping against an explicit call of the op.
    cache = LowRankKVCache(1, group_size=1, rank_k=5, rank_v=5, window=3, rope=ROPE)
    k, v = kv(S=30)
    cache.prefill(0, k, v)
    cache.compress()
    q = torch.randn(B, HQ, 1, D)
    k1, v1 = kv(S=1)
    cache.append(0, k1, v1)
    grp = cache._groups[0]
    n = grp.k_latent.length
    assert n == 28 and math.isclose(cache.window_length(0), 3)
    kt = cache._k[0].view(B, 3, HKV, D).transpose(1, 2)
    vt = cache._v[0].view(B, 3, HKV, D).transpose(1, 2)
    want = svdkernels.lowrank_attention_with_tail(q, grp.k_latent.view(), grp.v_latent.view(), grp.k_bases[0],
                                                  grp.v_bases[0], kt, vt, rope=ROPE)
    torch.testing.assert_close(cache.attend(0, q), want)
