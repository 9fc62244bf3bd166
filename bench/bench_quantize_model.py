"""pytest-benchmark version of the ``quantize_model`` bench family (``svdkernels/bench/quantize_model.py``).

Quantising all-MiniLM-L6-v2 (8 calibration sentences) with each method of the family:
SVDQuant W4A4/W4A16 r32 and its variants, and the naive round-to-nearest baselines.
The time is the whole-model quantisation; the average per-layer SQNR, the
sentence-embedding cosine and the weight bytes go into ``extra_info``. Not collected
by the test suite; run::

    python -m pytest bench/bench_quantize_model.py              # every method
    python -m pytest bench/bench_quantize_model.py -k quick     # the --quick methods only
"""
from __future__ import annotations

import pytest

from svdkernels.bench import quantize_model as family

CASES = [
    pytest.param(name, quantize, id=f"{'quick' if quick else 'full'}-{name}".replace(" ", "_").replace(",", ""))
    for name, _, quantize, quick in family.METHODS
]


@pytest.mark.parametrize(("name", "quantize"), CASES)
def test_quantize_minilm(benchmark, name: str, quantize) -> None:
    result = benchmark.pedantic(lambda: family.measure(quantize), rounds=1, iterations=1)
    benchmark.extra_info["avg_sqnr_db"] = result.avg_sqnr
    benchmark.extra_info["cos_mean"] = float(result.cos.mean())
    benchmark.extra_info["cos_min"] = float(result.cos.min())
    benchmark.extra_info["weight_bytes"] = result.weight_bytes
    benchmark.extra_info["fp32_bytes"] = result.fp32_bytes
