"""pytest-benchmark version of the ``lowrank_adam_step`` bench family
(``svdkernels/bench/lowrank_adam_step.py``).

Same workloads (one weight's fused GaLore Adam step, float32 and stochastically
rounded bfloat16 weights) and the same three methods: ours on the default backend,
ours on the reference backend and torch's full-rank AdamW step. The error against
float64 (in units of the update) goes into ``extra_info``. Not collected by the test
suite; run::

    python -m pytest bench/bench_lowrank_adam_step.py              # full workloads
    python -m pytest bench/bench_lowrank_adam_step.py -k quick     # the --quick workload only
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from svdkernels.backends import use_backend
from svdkernels.bench import lowrank_adam_step as family

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
METHODS = ("ours", "reference", "adamw")

CASES = [
    pytest.param(wl, dtype, which, id=f"{'quick' if quick else 'full'}-{wl.name(dtype)}-{which}".replace(" ", "_"))
    for quick in (False, True) for wl in family.workloads(quick) for dtype in family.DTYPES for which in METHODS
]


@pytest.mark.parametrize(("workload", "dtype", "which"), CASES)
def test_lowrank_adam_step(benchmark, workload: family.Workload, dtype: torch.dtype, which: str) -> None:
    t = family._problem(workload, dtype, DEVICE)
    if which == "adamw":
        opt, W, W0, w64 = family._adamw(t)
        with torch.no_grad():
            opt.step()
            benchmark.extra_info["upd err"] = family._upd_err(W.detach(), W0, w64)
            benchmark(opt.step)
        return
    step_size = family.bias_corrected_step_size(family.LR, *family.BETAS, family.STEP) * family.SCALE
    sr = 1234 if dtype == torch.bfloat16 else None
    backend = use_backend("reference") if which == "reference" else contextlib.nullcontext()
    with backend:
        W = family._ours(workload, t, step_size, sr)()
        benchmark.extra_info["upd err"] = family._upd_err(W, t["W"].double(), family._galore64(workload, t, step_size))
        benchmark(family._ours(workload, t, step_size, sr))
