"""The mixed-precision pass plan of the rsvd driver, backend by backend.

The Triton backend returns 16-bit products with their float32 accumulator intact
(``exact_16bit_products``), so for 16-bit input its last range pass and its
projection stay 16-bit (the projection with Q split in two halves). That plan is
checked here on the CPU with a stand-in backend that rounds operands exactly as
the kernels do, independent of the (slow) Triton interpreter.
"""
import pytest
import torch

from svdkernels.reference import rsvd as reference
from svdkernels.testing.matrices import relative_errors, spectral_matrix


class Exact16Passes(reference.TorchPasses):
    """Operands rounded to the pass dtype, products accumulated and returned in float32."""

    exact_16bit_products = True

    def matmul(self, A, X, *, transpose, dtype):
        A = A.to(dtype).float()
        X = X.to(dtype).float()
        return (A.mT if transpose else A) @ X


def test_plan_counts_and_precisions():
    plan = reference.plan_passes(torch.float32, 2, torch.bfloat16)
    assert [p.transpose for p in plan] == [False, True, False, True, False, True]
    assert [p.dtype for p in plan] == [torch.bfloat16] * 4 + [torch.float32] * 2
    assert not any(p.split for p in plan)
    rounded = reference.plan_passes(torch.bfloat16, 1, torch.bfloat16, exact_16bit_products=False)
    assert [p.dtype for p in rounded] == [torch.bfloat16] * 2 + [torch.float32] * 2
    exact = reference.plan_passes(torch.bfloat16, 0, torch.bfloat16, exact_16bit_products=True)
    assert [(p.dtype, p.split) for p in exact] == [(torch.bfloat16, False), (torch.bfloat16, True)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["exp", "poly"])
def test_exact_16bit_plan_meets_the_bound(kind, dtype):
    M = spectral_matrix(kind, 256, 256, batch=(2,), seed=3)
    A = M.A.to(dtype)
    A64 = A.double()
    U, S, Vh = reference.rsvd(A, 24, seed=0, passes=Exact16Passes())
    e = relative_errors(A64, U, S, Vh, torch.linalg.svdvals(A64))
    assert e["ratio"].max() <= 1.01, e["ratio"]
    assert e["orth"].max() <= 1e-4, e["orth"]


def test_split_projection_is_needed(monkeypatch):
    # Without the hi/lo split (lo half zeroed) the 16-bit projection loses the small
    # singular values of an exponentially decaying spectrum: the split is load-bearing.
    M = spectral_matrix("exp", 256, 256, batch=(1,), seed=3)
    A = M.A.to(torch.bfloat16)
    A64 = A.double()
    hi_only = lambda X, dtype: torch.cat([X.to(dtype), torch.zeros_like(X, dtype=dtype)], -1)  # noqa: E731
    monkeypatch.setattr(reference, "_split_halves", hi_only)
    U, S, Vh = reference.rsvd(A, 24, seed=0, passes=Exact16Passes())
    assert relative_errors(A64, U, S, Vh, torch.linalg.svdvals(A64))["ratio"].max() > 1.01
