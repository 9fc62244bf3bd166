"""pytest-benchmark version of the ``adapters`` bench family (``svdkernels/bench/adapters.py``).

Same workloads: PiSSA initialisation of Llama-shaped blocks (ours against peft's
``pissa`` and ``pissa_niter_4``; the principal-subspace error ratio goes into
``extra_info``), and the forward+backward step of one layer per method against the
frozen layer and peft's LoRA. Not collected by the test suite; run::

    python -m pytest bench/bench_adapters.py              # full workloads
    python -m pytest bench/bench_adapters.py -k quick     # the --quick workloads only
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from svdkernels.adapters import ALL_METHODS, adapt
from svdkernels.bench import adapters as family

INIT_CASES = [
    pytest.param(wl, which, id=f"{'quick' if quick else 'full'}-d{wl.d}-{which}")
    for quick in (False, True) for wl in family.workloads(quick)[0] for which in ("ours", "pissa_niter_4", "pissa")
]
STEP_CASES = [
    pytest.param(wl, method, id=f"{'quick' if quick else 'full'}-N{wl.tokens}-d{wl.d}-{method.replace(' ', '_')}")
    for quick in (False, True) for wl in family.workloads(quick)[1]
    for method in ("frozen", *[m for m in ALL_METHODS if m != "soka"], "peft LoRA")
]


@pytest.mark.parametrize(("workload", "which"), INIT_CASES)
def test_init(benchmark, workload: family.InitWorkload, which: str) -> None:
    from peft import LoraConfig, get_peft_model

    base = family._init_model(workload)

    def init():
        m = copy.deepcopy(base)
        if which == "ours":
            return adapt(m, "pissa", rank=family.RANK, seed=0)
        cfg = LoraConfig(r=family.RANK, lora_alpha=family.RANK, target_modules=list(family._PROJ),
                         init_lora_weights=which)
        return get_peft_model(m, cfg)

    model = benchmark.pedantic(init, rounds=1, iterations=1)
    ratios = family.subspace_ratios(model, family.optimal_errors(base))
    benchmark.extra_info["ratio_mean"] = sum(ratios) / len(ratios)
    benchmark.extra_info["ratio_max"] = max(ratios)


@pytest.mark.parametrize(("workload", "method"), STEP_CASES)
def test_step(benchmark, workload: family.StepWorkload, method: str) -> None:
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(workload.d, workload.d, bias=False)
    base.weight.requires_grad_(False)
    calib = [torch.randn(256, workload.d, generator=gen)]
    model = base if method == "frozen" else family._step_model(method, base, calib)
    x = torch.randn(workload.tokens, workload.d, generator=gen, requires_grad=True)
    g = torch.randn(workload.tokens, workload.d, generator=gen)

    def step():
        y = model(x)
        y.backward(g)
        return y

    benchmark(step)
