"""The low-rank cache inside a Hugging Face Llama: a tiny random model built here (nothing downloaded)."""
import pytest
import torch

pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb  # noqa: E402

from svdkernels.kv import LowRankHFCache, patch_llama_attention, rope_from_config, unpatch_llama_attention  # noqa: E402
from svdkernels.reference.lowrank_attention import apply_rope  # noqa: E402
from svdkernels.testing.errors import assert_raises_naming  # noqa: E402

LINEAR = {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}


def tiny_llama(rope_parameters=None, layers=4, seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    kw = {"rope_parameters": rope_parameters} if rope_parameters else {}
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **kw)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("rope_parameters", [None, LINEAR], ids=["default", "linear"])
def test_our_rope_is_the_models_rope(rope_parameters):
    model = tiny_llama(rope_parameters, layers=1)
    rope = rope_from_config(model.config)
    x = torch.randn(2, 2, 300, 16)
    pos = torch.arange(300).unsqueeze(0)
    cos, sin = LlamaRotaryEmbedding(model.config)(x, pos)
    want, _ = apply_rotary_pos_emb(x, x, cos, sin)
    got = apply_rope(x, torch.arange(300), theta=rope.theta, scaling=rope.scaling, layout=0, rotary_dim=16)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # same float32 angles; cos/sin rounding


def generate(model, ids, cache=None, n=12):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, cache=cache, pad_token_id=0)


@pytest.mark.parametrize("rope_parameters,G", [(None, 2), (LINEAR, 1)], ids=["default-G2", "linear-G1"])
def test_full_rank_generation_matches_the_models_own(rope_parameters, G):
    model = tiny_llama(rope_parameters)
    # 72 prompt tokens >= G·Hkv·d (64 for G = 2), so full-rank bases span every key; the
    # 4-token window overflows on the way, so generated tokens are projected onto them.
    ids = torch.randint(1, 128, (2, 72), generator=torch.Generator().manual_seed(1))
    want = generate(model, ids)
    assert patch_llama_attention(model) == 4
    cache = LowRankHFCache(model.config, group_size=G, window=4)
    got = generate(model, ids, cache)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # fp32 SVD, products in a different order
    assert cache.lowrank.seq_length(3) == 72 + 11 and cache.lowrank.window_length(3) == 4
    # Other caches still take the original path, and unpatching restores the class's forward.
    assert torch.equal(generate(model, ids, DynamicCache(config=model.config)).sequences, want.sequences)
    unpatch_llama_attention(model)
    assert "forward" not in vars(model.model.layers[0].self_attn)


def test_compressed_generation_runs_with_a_smaller_cache():
    model = tiny_llama()
    patch_llama_attention(model)
    ids = torch.randint(1, 128, (1, 200), generator=torch.Generator().manual_seed(2))
    cache = LowRankHFCache(model.config, group_size=2, rank_k=16, rank_v=16, window=8)
    out = generate(model, ids, cache, n=4)
    assert out.sequences.shape == (1, 204)
    assert cache.lowrank.nbytes() < cache.lowrank.dense_nbytes() / 2


def test_unpatched_model_refuses_the_cache():
    model = tiny_llama(layers=1)
    ids = torch.randint(1, 128, (1, 5))
    with pytest.raises(RuntimeError, match="patch_llama_attention"), torch.no_grad():
        model(ids, cache=LowRankHFCache(model.config))


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda: rope_from_config(LlamaConfig(rope_parameters={"rope_type": "llama3", "rope_theta": 1.0,
                                                                "factor": 8.0, "low_freq_factor": 1.0,
                                                                "high_freq_factor": 4.0,
                                                                "original_max_position_embeddings": 8})),
         ValueError, ["rope_type", "linear", "llama3"]),
        (lambda: patch_llama_attention(torch.nn.Linear(2, 2)), ValueError, ["model", "Llama-style", "Linear"]),
    ],
    ids=["rope-type", "not-llama"],
)
def test_bad_input_names_the_argument(call, exc, words):
    assert_raises_naming(call, exc, words)
