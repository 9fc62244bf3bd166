"""Model analyses of svdkernels.analysis on tiny BERT/Llama/GPT-2 models, against the
per-layer (and per-sample) float64 loops of the definitions."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from svdkernels.analysis import (
    composition_scores,
    detect_layout,
    gradient_spectra,
    model as analysis_model,
    model_intruders,
    spectra,
)

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 50


def tiny(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                      intermediate_size=48, max_position_embeddings=32)
        model = transformers.BertModel(cfg)
    elif kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    return model.eval()


def dense_heads(model: nn.Module) -> list[dict[str, list[torch.Tensor]]]:
    """Per layer, per head: float64 ``[d, d]`` ``qk`` = W_Qᵀ W_K and ``ov`` = W_O W_V, built the long way."""
    out = []
    named = dict(model.named_modules())
    for layer in detect_layout(model).layers(model):
        w = {}
        for r, ref in layer.refs.items():
            W = named[ref.module].weight.detach().double()
            W = W.T if ref.transposed else W
            w[r] = W if ref.rows is None else W[ref.rows[0]:ref.rows[1]]
        H, dh, g = layer.n_heads, layer.head_dim, layer.n_heads // layer.n_kv_heads
        heads = {"qk": [], "ov": []}
        for h in range(H):
            q, k = w["q"][h * dh:(h + 1) * dh], w["k"][(h // g) * dh:(h // g + 1) * dh]
            v, o = w["v"][(h // g) * dh:(h // g + 1) * dh], w["o"][:, h * dh:(h + 1) * dh]
            heads["qk"].append(q.T @ k)
            heads["ov"].append(o @ v)
        out.append(heads)
    return out


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_spectra_match_per_layer_svd_one_call_per_shape(kind: str, monkeypatch) -> None:
    model = tiny(kind)
    calls = []
    real = analysis_model.singular_values

    def counting(A, **kw):
        calls.append(tuple(A.shape))
        return real(A, **kw)

    monkeypatch.setattr(analysis_model, "singular_values", counting)
    got = spectra(model)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}
    assert list(got) == list(linears)
    shapes = {tuple(m.weight.shape) for m in linears.values()}
    assert len(calls) == len(shapes)  # one batched call per shape
    for name, m in linears.items():
        torch.testing.assert_close(got[name].double(), torch.linalg.svdvals(m.weight.detach().double()),
                                   rtol=1e-5, atol=1e-6)
    top = spectra(model, k=3)
    assert all(v.shape == (3,) for v in top.values())
    calls.clear()
    fast = spectra(model, k=3, rtol=1e-3)  # rtol reaches each batched call
    assert len(calls) == len(shapes)
    for name, m in linears.items():
        want = torch.linalg.svdvals(m.weight.detach().double())[:3]
        assert float(((fast[name].double() - want).abs() / want).max()) <= 1e-3
    with pytest.raises(ValueError, match=r"rtol: expected a number in \[1e-6, 1\)"):
        spectra(model, rtol=0.0)


def test_model_intruders_zero_against_itself_and_counts_a_planted_update() -> None:
    base = tiny("bert")
    assert all(int(r.count) == 0 for r in model_intruders(base, base).values())
    ft = copy.deepcopy(base)
    target = "encoder.layer.1.attention.self.value"
    W = dict(ft.named_modules())[target].weight
    U, S, Vh = torch.linalg.svd(W.detach().double())
    with torch.no_grad():  # a strong rank-1 update spread over W's 16 bottom directions
        x, y = U[:, -16:].sum(1) / 4, Vh[-16:].sum(0) / 4
        W += (3 * S[0] * torch.outer(x, y)).float()
    res = model_intruders(base, ft, k=10)
    assert {n: int(r.count) for n, r in res.items() if int(r.count)} == {target: 1}
    assert bool(res[target].mask[0])


def test_model_intruders_bad_input() -> None:
    base, other = tiny("bert"), tiny("gpt2")
    with pytest.raises(ValueError, match="finetuned: expected a module"):
        model_intruders(base, other)
    wide = tiny("bert")
    wide.encoder.layer[0].attention.self.query = nn.Linear(32, 40)
    with pytest.raises(ValueError, match=r"finetuned: expected encoder\.layer\.0\.attention\.self\.query\.weight "):
        model_intruders(base, wide)
    bad = copy.deepcopy(base)
    with torch.no_grad():
        bad.encoder.layer[0].attention.self.key.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        spectra(bad)


def _batch(lengths: list[int], kind: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    T = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), T), generator=gen)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    batch = {"input_ids": ids * mask, "attention_mask": mask}
    if kind != "bert":
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :2] = -100  # a two-token "prompt": the loss is on the response only
        batch["labels"] = labels
    return batch


def _bert_loss(output, batch) -> torch.Tensor:
    # A fixed readout of each token, squared, averaged over the valid tokens (not ‖h‖²:
    # after BERT's final LayerNorm that is constant and its gradient pure rounding noise).
    h = output.last_hidden_state
    w = torch.linspace(-1, 1, h.shape[-1], dtype=h.dtype)
    return ((h @ w).pow(2) * batch["attention_mask"]).sum(-1) / batch["attention_mask"].sum(-1)


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_gradient_spectra_equal_the_per_sample_loop(kind: str) -> None:
    model = tiny(kind)
    lengths = [9, 6, 12, 4]  # padded batch; 12 tokens < 32 = min(out, in): the T×T core path
    batch = _batch(lengths, kind)
    loss_fn = _bert_loss if kind == "bert" else None
    got = gradient_spectra(model, [batch], loss_fn=loss_fn, k=5)
    layers = detect_layout(model).layers(model)
    assert got.names == [f"layers.{l.index}.{r}" for l in layers for r in "qkvo"]
    assert got.nuclear_norm.shape == (len(got.names), 4) and got.top.shape == (len(got.names), 4, 5)
    assert all(p.grad is None for p in model.parameters())  # no .grad written

    named = dict(model.named_modules())
    for b, n in enumerate(lengths):
        one = {k: v[b:b + 1, :n] for k, v in batch.items()}  # the sample alone, unpadded
        model.zero_grad()
        out = model(**{k: v for k, v in one.items() if k != "labels"})
        loss = _bert_loss(out, one) if kind == "bert" else analysis_model.causal_lm_loss(out, one)
        loss.sum().backward()
        for t, name in enumerate(got.names):
            i, role = int(name.split(".")[1]), name.split(".")[2]
            ref = layers[i].refs[role]
            G = named[ref.module].weight.grad.double()
            G = G.T if ref.transposed else G
            G = G if ref.rows is None else G[ref.rows[0]:ref.rows[1]]
            S = torch.linalg.svdvals(G)
            p = S / S.sum()
            # float32 forward/backward of a batch vs one sample: sums in another order.
            torch.testing.assert_close(got.nuclear_norm[t, b].double(), S.sum(), rtol=1e-4, atol=1e-7)
            erank = (-(p * p.clamp_min(1e-300).log()).sum()).exp()
            torch.testing.assert_close(got.effective_rank[t, b].double(), erank, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got.top[t, b].double(), S[:5], rtol=1e-4, atol=1e-7)
    model.zero_grad()


def test_gradient_spectra_long_samples_and_explicit_modules() -> None:
    # T = 20 >= min(out, in) = 16: the dense-gradient path; explicit module names.
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 16))
    x = torch.randn(3, 20, 16)
    got = gradient_spectra(model, [x, x[:1]], modules=["0", "2"], loss_fn=lambda out, b: out.pow(2).sum((1, 2)), k=4)
    assert got.names == ["0", "2"] and got.nuclear_norm.shape == (2, 4)
    for s, xb in enumerate([x[0], x[1], x[2], x[0]]):
        model.zero_grad()
        model(xb[None]).pow(2).sum().backward()
        for t, m in enumerate([model[0], model[2]]):
            S = torch.linalg.svdvals(m.weight.grad.double())
            torch.testing.assert_close(got.top[t, s].double(), S[:4], rtol=1e-4, atol=1e-6)


def test_gradient_spectra_bad_input() -> None:
    model = tiny("gpt2")
    with pytest.raises(ValueError, match="batches: expected at least one batch"):
        gradient_spectra(model, [])
    with pytest.raises(TypeError, match="batches: expected an iterable of batches"):
        gradient_spectra(model, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="batches: the default loss"):
        gradient_spectra(model, [{"input_ids": torch.ones(1, 4, dtype=torch.long)}])
    with pytest.raises(ValueError, match=r"model: unrecognised layout for Sequential; supported layouts: bert"):
        gradient_spectra(nn.Sequential(nn.Linear(4, 4)), [torch.randn(2, 4)])
    with pytest.raises(ValueError, match="modules: expected names of modules"):
        gradient_spectra(model, [torch.ones(1, 4)], modules=["nope"])
    shared = nn.Linear(4, 4)  # one module called twice: g_bᵀ x_b of one call is not its gradient
    with pytest.raises(ValueError, match="modules: '0' ran twice in one forward"):
        gradient_spectra(nn.Sequential(shared, shared), [torch.randn(2, 4)], modules=["0"],
                         loss_fn=lambda out, b: out.sum(-1))


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("comp", ["q", "k", "v"])
def test_composition_scores_match_dense_definition(kind: str, comp: str) -> None:
    model = tiny(kind).double()
    heads = dense_heads(model)
    res = composition_scores(model, comp, per_component=True)
    L, H = len(heads), len(heads[0]["ov"])
    assert res.scores.shape == (L, H, L, H) and res.scores.dtype == torch.float64
    fro = torch.linalg.matrix_norm
    for i in range(L):
        for a in range(H):
            ov = heads[i]["ov"][a]
            U, S, _ = torch.linalg.svd(ov)
            dh = res.components.shape[2]
            torch.testing.assert_close(res.writer_singular_values[i, a], S[:dh], rtol=1e-8, atol=1e-12)
            for j in range(L):
                for b in range(H):
                    if j <= i:
                        assert torch.isnan(res.scores[i, a, j, b])
                        continue
                    M = {"q": heads[j]["qk"][b].T, "k": heads[j]["qk"][b], "v": heads[j]["ov"][b]}[comp]
                    want = fro(M @ ov) / (fro(M) * fro(ov))
                    torch.testing.assert_close(res.scores[i, a, j, b], want, rtol=1e-9, atol=0)
                    per = torch.linalg.vector_norm(M @ U[:, :dh], dim=0) / fro(M)
                    torch.testing.assert_close(res.components[i, a, :, j, b], per, rtol=1e-9, atol=1e-12)


def test_composition_of_a_head_with_its_own_transpose() -> None:
    # Reader OV = (writer OV)ᵀ: V-composition = ‖W_OVᵀ W_OV‖_F / ‖W_OV‖_F² = sqrt(Σσ⁴) / Σσ².
    model = tiny("bert").double()
    dh = 8
    l0, l1 = model.encoder.layer[0].attention, model.encoder.layer[1].attention
    with torch.no_grad():
        V0 = l0.self.value.weight[:dh].clone()  # head 0: [dh, d]
        O0 = l0.output.dense.weight[:, :dh].clone()  # [d, dh]
        l1.self.value.weight[:dh] = O0.T
        l1.output.dense.weight[:, :dh] = V0.T
    S = torch.linalg.svdvals(O0 @ V0)
    want = S.pow(4).sum().sqrt() / S.pow(2).sum()
    got = composition_scores(model, "v").scores[0, 0, 1, 0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)


def test_composition_bad_input() -> None:
    with pytest.raises(ValueError, match="kind: expected 'q', 'k' or 'v'"):
        composition_scores(tiny("bert"), "x")
    with pytest.raises(ValueError, match="layout: expected one of"):
        composition_scores(tiny("bert"), layout="t5")
    with pytest.raises(ValueError, match="no module matches the llama layout"):
        composition_scores(tiny("bert"), layout="llama")
