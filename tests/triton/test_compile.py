"""Every Triton kernel compiles for sm_80 and sm_90 without a GPU (level 3 of
docs/architecture.md): one parametrised test over every family's ``compile_cases()``.

Each kernel x config x dtype must assemble with zero spills, fit in shared memory
and, where its inner loop is a ``tl.dot``, use the tensor cores; families add their
own instruction checks below. All builds run in one batch over all CPUs (child
processes without the interpreter); ``pytest -s`` prints registers and shared memory.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler")  # ptxas ships with the NVIDIA backend

import svdkernels.triton  # noqa: E402
from svdkernels.testing.compile_check import (  # noqa: E402
    CompileReport,
    check_report,
    compile_kernel,
    reports_by_case,
)
from svdkernels.triton.common import CompileCase  # noqa: E402

CCS = (80, 90)


def _families() -> dict[str, list[CompileCase]]:
    """``{family: cases}`` for every kernel module of svdkernels/triton with ``compile_cases()``."""
    found = {}
    for info in pkgutil.iter_modules(svdkernels.triton.__path__):
        module = importlib.import_module(f"svdkernels.triton.{info.name}")
        if hasattr(module, "compile_cases"):
            found[info.name] = list(module.compile_cases())
    return found


FAMILIES = _families()
CASES = [(family, case) for family, cases in FAMILIES.items() for case in cases]


def _key(family: str, case: CompileCase) -> str:
    return f"{family}/{case.id}"


@pytest.fixture(scope="session")
def reports() -> dict[tuple[str, int], CompileReport]:
    # One batch over all CPUs for every family: the builds are independent.
    renamed = [dataclasses.replace(case, id=_key(family, case)) for family, case in CASES]
    return reports_by_case(renamed, CCS)


def _lowrank_quant_checks(case: CompileCase, report: CompileReport, cc: int) -> bool:
    """The K loop's own dot (not only the epilogue's TF32 one) is on the tensor cores:
    int4 products as int8 (s8 x s8 -> s32), 16-bit x as itself, float32 as TF32.
    Returns whether the generic tensor-core check applies."""
    kernel, _, dtype = case.id.split("-")[:3]
    small_m = cc >= 90 and case.constexprs["BLOCK_M"] < 64
    operands = r"s32\.s8\.s8" if kernel == "w4a4" else {"bf16": r"bf16\.bf16", "fp16": r"\.f16\.f16",
                                                         "fp32": r"tf32\.tf32"}[dtype]
    instruction = r"mma\.sync" if cc < 90 or small_m else r"wgmma\.mma_async"
    assert re.search(instruction + r"\S*" + operands, report.ptx), f"{case.id}: no {instruction} on {operands}"
    if small_m:
        # wgmma's M is 64 (one warpgroup): triton runs 16-row dots ("decode", "q16")
        # on mma.sync on sm_90.
        assert report.has_mma and not report.has_wgmma, report.summary()
        return False
    return True


# Family-specific checks; each returns whether the generic tensor-core check applies.
EXTRA_CHECKS = {"lowrank_quant": _lowrank_quant_checks}


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm{cc}")
@pytest.mark.parametrize("family,case", CASES, ids=[_key(f, c) for f, c in CASES])
def test_compiles_without_spills(family, case, cc, reports):
    report = reports[(_key(family, case), cc)]
    print(f"\n{_key(family, case):40s} {report.summary()}")
    extra = EXTRA_CHECKS.get(family)
    generic_tensor_cores = extra(case, report, cc) if extra else True
    check_report(report, expects_tensor_cores=case.expects_tensor_cores and generic_tensor_cores)


def test_every_kernel_family_has_compile_cases():
    assert {"rsvd", "kron_linear", "lowrank_quant", "lowrank_attention"} <= set(FAMILIES)
    assert all(FAMILIES.values())
    keys = [_key(f, c) for f, c in CASES]
    assert len(keys) == len(set(keys))


def test_compile_kernel_single():
    # The one-kernel entry point (a child process when this one interprets).
    case = next(c for c in FAMILIES["rsvd"] if c.id == "gaussian-any")
    report = compile_kernel(case.kernel, case.signature, case.constexprs, cc=80, **case.options)
    assert report.name == "_gaussian_kernel" and report.cc == 80 and report.registers > 0


def test_check_report_names_every_problem():
    bad = CompileReport(cc=90, name="k", registers=255, spill_stores=8, spill_loads=4,
                        shared_bytes=300_000, has_mma=True, has_wgmma=False, ptx="")
    with pytest.raises(AssertionError) as err:
        check_report(bad, expects_tensor_cores=True)
    assert "spills 8 B" in str(err.value) and "shared memory" in str(err.value) and "wgmma" in str(err.value)
    clean = dataclasses.replace(bad, spill_stores=0, spill_loads=0, shared_bytes=1024)
    check_report(clean, expects_tensor_cores=False)
