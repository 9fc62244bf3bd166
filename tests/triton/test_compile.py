"""rsvd's Triton kernels compile for sm_80 and sm_90 without a GPU (level 3 of DESIGN.md).

Every kernel x config x compute dtype (``svdkernels.triton.rsvd.compile_cases``)
must assemble with zero spills, fit in shared memory and, where its inner loop is a
``tl.dot``, use the tensor cores. ``pytest -s`` prints registers and shared memory.
"""
import dataclasses

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler")  # ptxas ships with the NVIDIA backend

from svdkernels.testing.compile_check import (  # noqa: E402
    CompileReport,
    check_report,
    compile_kernel,
    reports_by_case,
)
from svdkernels.triton import rsvd as tr  # noqa: E402

CCS = (80, 90)
CASES = list(tr.compile_cases())


@pytest.fixture(scope="module")
def reports():
    # One batch over all CPUs: a cold compile of all 112 builds takes ~40 s on 2 cores.
    return reports_by_case(CASES, CCS)


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm{cc}")
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_compiles_without_spills(case, cc, reports):
    report = reports[(case.id, cc)]
    print(f"\n{case.id:30s} {report.summary()}")
    check_report(report, expects_tensor_cores=case.expects_tensor_cores)


def test_compile_kernel_single():
    # The one-kernel entry point (a child process when this one interprets).
    case = next(c for c in CASES if c.id == "gaussian-any")
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
