"""pytest-benchmark version of the ``lowrank_quant`` bench family (``svdkernels/bench/lowrank_quant.py``).

Same workloads (Llama-7B-shaped layers 4096x4096 and 11008x4096 at 1 and 16 tokens,
rank 32; quick: 512x1024) and the same methods: ours (``lowrank_w4a16_linear``, the
C++ kernel on the CPU) with bf16 and fp32 activations and without the branch,
``F.linear`` on the dequantised weight in fp32 and bf16, and
``torch.ops.aten._weight_int4pack_mm_for_cpu``. Weights are cold (each call reads
another copy, as decoding does). Each method's relative error against float64 goes
into ``extra_info``. Not collected by the test suite; run::

    python -m pytest bench/bench_lowrank_quant.py              # full workloads
    python -m pytest bench/bench_lowrank_quant.py -k quick     # the --quick workloads only
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from svdkernels.bench import lowrank_quant as family

CASES = [
    pytest.param(wl, m, quick, id=f"{'quick' if quick else 'full'}-{wl.N}x{wl.K}-M{wl.M}-{m.name}".replace(" ", "_"))
    for quick in (False, True) for wl in family.workloads(quick) for m in family.METHODS
]


@pytest.mark.parametrize(("workload", "method", "quick"), CASES)
def test_lowrank_quant(benchmark, workload: family.Workload, method: family.Method, quick: bool) -> None:
    lay = family.layer(workload.N, workload.K, workload.rank)
    weights = method.prepare(lay)
    cold = family.COLD_BYTES // 16 if quick else family.COLD_BYTES
    copies = [weights] + [tuple(t.clone() for t in weights)
                          for _ in range(math.ceil(cold / family._nbytes(weights)) - 1)]
    cycle = itertools.cycle(copies)
    x = torch.randn(workload.M, workload.K, generator=torch.Generator().manual_seed(workload.M)).to(method.act_dtype)
    y = benchmark(lambda: method.run(x, *next(cycle)))
    branch = (lay.L_down, lay.L_up) if method.branch else (None, None)
    benchmark.extra_info["rel_err"] = family.rel_err(y, family.exact(x, lay.residual(), *branch))
