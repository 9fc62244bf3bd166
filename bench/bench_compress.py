"""pytest-benchmark version of the ``compress`` bench family (``svdkernels/bench/compress.py``).

Same workloads: every compression method and budget on all-MiniLM-L6-v2 at keep
0.8/0.6/0.4 (compress_model timed once per case: it is deterministic and takes
seconds; held-out cosine, layer SQNR and kept fraction go into ``extra_info``), and
LowRankLinear at keep 0.5 against the dense layer. Not collected by the test suite; run::

    python -m pytest bench/bench_compress.py              # full workloads
    python -m pytest bench/bench_compress.py -k quick     # the small ones only
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from svdkernels.bench import compress as family
from svdkernels.compress import METHODS, LowRankLinear, compress_model

MODEL_CASES = [
    pytest.param(keep, method, budget, id=f"full-keep{keep}-{method}-{budget}")
    for keep in family.KEEPS for method in METHODS for budget in family.BUDGETS
] + [pytest.param(0.6, "svd_llm", budget, id=f"quick-keep0.6-svd_llm-{budget}") for budget in family.BUDGETS]
LAYER_CASES = [
    pytest.param(tokens, d, which, id=f"{'quick' if d == 1024 else 'full'}-{tokens}x{d}-{which}")
    for tokens, d in ((2048, 4096), (256, 1024)) for which in ("lowrank", "dense")
]


@pytest.mark.parametrize(("keep", "method", "budget"), MODEL_CASES)
def test_compress_minilm(benchmark, keep: float, method: str, budget: str) -> None:
    base = family._minilm()[0]
    calib, held = family.texts(family.BLOCK, family.CALIB_BLOCKS, family.EVAL_BLOCKS)
    names = [n for n, m in base.named_modules() if type(m) is nn.Linear and n.startswith("encoder.")]

    def run() -> nn.Module:
        return compress_model(copy.deepcopy(base), calib, method=method, keep=keep, budget=budget,
                              targets=family.TARGETS)

    model = benchmark.pedantic(run, rounds=1, iterations=1)
    cos = (family.embeddings(model, held) * family.embeddings(base, held)).sum(-1)
    noise = family.layer_noise(base, model, held, names)
    benchmark.extra_info.update(
        cos_mean=float(cos.mean()), cos_min=float(cos.min()),
        sqnr_db=-10 * math.log10(max(sum(noise.values()) / len(noise), 1e-30)),
        kept=family.linear_params(model, names) / family.linear_params(base, names))


@pytest.mark.parametrize(("tokens", "d", "which"), LAYER_CASES)
def test_lowrank_linear(benchmark, tokens: int, d: int, which: str) -> None:
    g = torch.Generator().manual_seed(0)
    rank = d // 4  # keep 0.5: r·2d = d²/2
    x = torch.randn(tokens, d, generator=g)
    if which == "lowrank":
        layer = LowRankLinear(torch.randn(d, rank, generator=g), torch.randn(rank, d, generator=g)).requires_grad_(False)
        fn = lambda: layer(x)  # noqa: E731
    else:
        W = torch.randn(d, d, generator=g)
        fn = lambda: F.linear(x, W)  # noqa: E731
    with torch.no_grad():
        benchmark(fn)
