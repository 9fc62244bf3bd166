"""pytest-benchmark version of the ``kron_linear`` bench family (``svdkernels/bench/kron_linear.py``).

Same workloads (a d×d layer with a peft-default LoKr adapter, 2048 tokens) and the
same three models: the frozen base, ours (KronLinear from the peft adapter) and
peft's LoKr layer; forward and forward+backward. The adapter output's relative
error against float64 goes into ``extra_info``. Not collected by the test suite; run::

    python -m pytest bench/bench_kron_linear.py              # full workloads
    python -m pytest bench/bench_kron_linear.py -k quick     # the --quick workload only
"""
from __future__ import annotations

import functools
import tempfile

import pytest
import torch

from svdkernels.bench import kron_linear as family

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MODELS = ("base", "peft", "ours")


@functools.cache
def models(wl: family.Workload):
    with tempfile.TemporaryDirectory() as path:
        return dict(zip(MODELS, family._models(wl, path, DEVICE)))


CASES = [
    pytest.param(wl, which, backward, id=f"{'quick' if quick else 'full'}-{wl.name}-{which}-"
                 f"{'fwd_bwd' if backward else 'fwd'}".replace(" ", "_"))
    for quick in (False, True) for wl in family.workloads(quick)
    for backward in (False, True) for which in MODELS
]


@pytest.mark.parametrize(("workload", "which", "backward"), CASES)
def test_kron_linear(benchmark, workload: family.Workload, which: str, backward: bool) -> None:
    ms = models(workload)
    torch.manual_seed(0)
    x = torch.randn(workload.tokens, workload.d, device=DEVICE, requires_grad=backward)
    model = ms[which]

    def step():
        with torch.set_grad_enabled(backward):
            y = model(x)
            if backward:
                y.backward(torch.ones_like(y))
        return y

    benchmark(step)
    if which != "base":
        layer = ms["ours"].proj
        want = x.detach().double() @ layer.delta_weight().double().T
        benchmark.extra_info["err"] = family._delta_error(model, ms["base"], x.detach(), want)
