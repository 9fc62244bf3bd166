"""``python -m svdkernels gpucheck --out DIR`` (and ``scripts/gpu_check.sh DIR``): one
command that proves the Triton kernels on a real GPU within a few minutes.

A lent GPU machine comes with its own Python, torch and triton, no network and a
short lease, so the check must run in one go with nothing to debug on the spot.
It runs a fixed list of stages, each in child processes under its own time budget
(a stage that overruns is killed, reported as ``timeout``, and the next one runs):

``environment``
    GPU, driver, CUDA, torch, triton, SM count; imports svdkernels and checks that
    every op registered (the compatibility smoke test for the machine's versions).
``build``
    the optional C++ extension, built in place with the machine's torch; a failed
    build is a note, not a failure (the kernel tests do not need it).
``kernel_tests``
    ``pytest tests/triton tests/ops`` with ``TRITON_INTERPRET`` unset, so every kernel
    runs for real against the reference (bf16/fp16, the int8 tensor-core paths,
    determinism); pass/fail per op family. The sm_80/sm_90 compile check is left
    out: on a GPU the tests compile the kernels anyway.
``bench``
    ``python -m svdkernels bench --quick --device cuda``, one child per family so
    that a family cut by the budget keeps the ones before it.
``compile`` (opt-in)
    ``tests/triton/test_compile.py``, last, under its own budget.
``report``
    ``gpucheck.json`` (everything), ``report.md`` (pass/fail per family, the bench
    tables, the fraction of the roofline per kernel), ``bench.json``, ``bench.png``
    and ``gpucheck.log``: at most :data:`MAX_FILES` files in DIR.

``--dry-run`` runs every stage on the CPU (the kernel tests under the interpreter
on a small ``-k`` subset, one cheap bench family, the build only probed), so the
test suite checks the script itself.

This package sits at the top beside ``bench`` and ``__main__``: it imports only the
standard library (the parent process never imports torch, so a hung CUDA call in
a child cannot stall the budget keeping) and no library code imports it.
"""
from __future__ import annotations

from svdkernels.gpucheck.check import (
    DEFAULT_BUDGETS,
    DEFAULT_STAGES,
    DRY_RUN_BUDGETS,
    MAX_FILES,
    SCHEMA,
    STAGES,
    configure,
    run_check,
    run_cli,
)
from svdkernels.gpucheck.report import (
    family_of,
    parse_junit,
    parse_pytest_lines,
    per_family,
    render_markdown,
    roofline_fractions,
)
from svdkernels.gpucheck.runner import Clock, Context, StageResult, StageTimeout, call, run_stages
from svdkernels.gpucheck.stages import BENCH_FAMILIES, OPS

__all__ = [
    "BENCH_FAMILIES", "DEFAULT_BUDGETS", "DEFAULT_STAGES", "DRY_RUN_BUDGETS", "MAX_FILES", "OPS", "SCHEMA",
    "STAGES", "Clock", "Context", "StageResult", "StageTimeout", "call", "configure", "family_of",
    "parse_junit", "parse_pytest_lines", "per_family", "render_markdown", "roofline_fractions", "run_check",
    "run_cli", "run_stages",
]
