"""pytest-benchmark version of the ``lowrank_attention`` bench family (``svdkernels/bench/lowrank_attention.py``).

Same decode workloads (B=1, Hq=32, Hkv=8, d=128, rk=rv=256, T in 4k/16k/32k; quick:
2k) and methods: ours absorbed (no RoPE), ours pre-RoPE, ours absorbed over a bf16
cache, and ``scaled_dot_product_attention`` over the dense fp32 cache. The relative
error against float64 and the cache bytes go into ``extra_info``. Not collected by
the test suite; run::

    python -m pytest bench/bench_lowrank_attention.py              # full workloads
    python -m pytest bench/bench_lowrank_attention.py -k quick     # the --quick workload only
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from svdkernels import lowrank_attention
from svdkernels.bench import lowrank_attention as family

METHODS = ("absorbed", "pre-RoPE", "absorbed bf16", "dense SDPA")
CASES = [
    pytest.param(wl, m, id=f"{'quick' if quick else 'full'}-T{wl.T}-{m.replace(' ', '_')}")
    for quick in (False, True) for wl in family.workloads(quick) for m in METHODS
]


@functools.lru_cache(maxsize=1)
def _cache(wl: family.Workload):
    c = family.make_cache(wl)
    return c, family.dense_kv(c, wl, family.ROPE, torch.float32)


@pytest.mark.parametrize(("workload", "method"), CASES)
def test_decode(benchmark, workload: family.Workload, method: str) -> None:
    c, (K, V) = _cache(workload)
    rope = family.ROPE if method in ("pre-RoPE", "dense SDPA") else None
    if method == "dense SDPA":
        stored = family.nbytes(K, V)
        y = benchmark(lambda: F.scaled_dot_product_attention(c.q, K, V, enable_gqa=True))
    else:
        args = (c.q, c.Ck, c.Cv, c.Wk, c.Wv)
        if method == "absorbed bf16":
            args = tuple(t.bfloat16() for t in args)
        stored = family.nbytes(*args[1:])
        y = benchmark(lambda: lowrank_attention(*args, rope=rope))
    benchmark.extra_info["rel_err"] = family.rel_err(y, family.exact(c, workload, rope))
    benchmark.extra_info["cache_bytes"] = stored
