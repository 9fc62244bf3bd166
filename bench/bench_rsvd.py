"""pytest-benchmark version of the ``rsvd`` bench family (``svdkernels/bench/rsvd.py``).

Same workloads, methods and bare products; each benchmark records its accuracy in
``extra_info``. Not collected by the test suite (``testpaths = ["tests"]``); run::

    python -m pytest bench/bench_rsvd.py                  # full workloads
    python -m pytest bench/bench_rsvd.py -k quick         # the --quick workloads only
    python -m pytest bench/bench_rsvd.py --benchmark-json out.json
"""
from __future__ import annotations

import pytest
import torch

from svdkernels.bench import rsvd as family

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Workload-major order, so each workload's matrices are built once
# (family.matrices caches the latest workload).
CASES = [
    pytest.param(wl, name, id=f"{'quick' if quick else 'full'}-{wl.name}-{name}".replace(" ", "_"))
    for quick in (False, True)
    for wl in family.workloads(quick)
    for name in (family.OURS, *wl.peers, family.BARE, family.FP32)
]


@pytest.mark.parametrize(("workload", "method"), CASES)
def test_rsvd(benchmark, workload: family.Workload, method: str) -> None:
    mats = family.matrices(workload, str(DEVICE))
    if method in (family.BARE, family.FP32):
        products = family.product_operands(
            mats.A, workload.rank, family.pass_plan(DEVICE), fp32=method == family.FP32
        )
        benchmark(family.run_products, products)
        return
    spec = family.METHODS[method]
    inputs = spec.prepare(mats.A)
    torch.manual_seed(0)  # torch.svd_lowrank draws from the global generator
    factors = benchmark(spec.run, inputs, workload.rank)
    benchmark.extra_info.update(family.accuracy(workload, mats, factors))


# Drop-in rows (issue 18): sparse, float64 and the accuracy mode, ours and the peer.
VARIANT_CASES = [
    pytest.param(v, id=f"{'quick' if quick else 'full'}-{v.name}".replace(" ", "_"))
    for quick in (False, True)
    for v in family.variant_workloads(quick)
]


@pytest.mark.parametrize("variant", VARIANT_CASES)
def test_rsvd_variants(benchmark, variant: family.Variant) -> None:
    rows = benchmark.pedantic(lambda: list(family._variant_rows(variant, 1, DEVICE)), rounds=1, iterations=1)
    benchmark.extra_info.update({f"{r.method}: time_ms": r.time_ms for r in rows})
    benchmark.extra_info.update({f"{r.method}: {k}": v for r in rows for k, v in r.errors.items()})
