"""The C++ kernels of kron_linear (csrc/cpu/kron_linear*.cpp), every instruction-set
path this CPU runs, against float64 autograd of the dense map ``x @ (Σ A_i ⊗ B_i)ᵀ``
and the reference backend (gradchecked in float64 in tests/ops/test_kron_linear.py;
the C++ kernels are float32): forward and the fused backward, odd shapes that
leave remainders in every tile, several Kronecker terms, any subset of gradients,
low-rank factors, thread-count independence, the public op's dispatch and the
internal ops' contract.

Skipped when svdkernels._C is not built, unless SVDKERNELS_REQUIRE_EXTENSION=1.
"""

import pytest
import torch

import svdkernels
from svdkernels.backends import use_backend
from svdkernels.ops import kron_linear_cpp as cpp

from cpp_support import ISA_NAMES, isas, require_extension  # noqa: E402 (tests/cpp on sys.path)

require_extension()

OPS = torch.ops.svdkernels
ISAS = isas()
# (N, r, a1, a2, b1, b2): remainders everywhere; one adapter-like shape (32x32 factors).
SHAPES = [(37, 2, 5, 7, 6, 9), (70, 1, 32, 32, 32, 32), (19, 3, 16, 8, 24, 40)]


def dense_grads(x, A, B, g, scale):
    """float64 autograd of y = scale·x @ (Σ_i kron(A_i, B_i))ᵀ: (y, ∂x, ∂A, ∂B)."""
    x, A, B = (t.double().requires_grad_(True) for t in (x, A, B))
    W = sum(torch.kron(A[i], B[i]) for i in range(A.shape[0]))
    y = scale * x @ W.T
    y.backward(g.double())
    return y.detach(), x.grad, A.grad, B.grad


def close(got, want, what):
    # float32 sums of a few hundred products: relative to the largest entry.
    err = float((got.double() - want).abs().max() / want.abs().max())
    assert got.dtype == torch.float32 and got.shape == want.shape and err < 2e-6, f"{what}: {err:.3g}"


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES.get)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_backward_against_float64(isa, shape):
    N, r, a1, a2, b1, b2 = shape
    g = torch.Generator().manual_seed(N)
    x, g_y = torch.randn(N, a2 * b2, generator=g), torch.randn(N, a1 * b1, generator=g)
    A, B = torch.randn(r, a1, a2, generator=g), torch.randn(r, b1, b2, generator=g)
    y64, gx64, gA64, gB64 = dense_grads(x, A, B, g_y, 0.75)
    close(OPS._cpp_kron_linear(x, A, B, 0.75, isa), y64, "y")
    gx, gA, gB = OPS._cpp_kron_linear_backward(g_y, x, A, B, 0.75, True, True, True, isa)
    close(gx, gx64, "∂x")
    close(gA, gA64, "∂A")
    close(gB, gB64, "∂B")
    # Any subset: the same values, empty tensors for what is not asked for.
    for needs in ((True, False, False), (False, True, False), (False, False, True), (False, True, True)):
        part = OPS._cpp_kron_linear_backward(g_y, x, A, B, 0.75, *needs, isa)
        for want, got, need in zip((gx, gA, gB), part, needs):
            assert torch.equal(got, want) if need else got.numel() == 0


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES.get)
def test_lowrank_factors_match_reference(isa):
    g = torch.Generator().manual_seed(3)
    x, g_y = torch.randn(50, 12 * 10, generator=g), torch.randn(50, 9 * 11, generator=g)
    A = [torch.randn(2, 9, 12, generator=g)]
    B = [torch.randn(2, 11, 3, generator=g), torch.randn(2, 3, 10, generator=g)]
    from svdkernels.reference import kron_linear as reference

    want = reference.backward(g_y.double(), x.double(), [t.double() for t in A], [t.double() for t in B], 0.5,
                              (True, True, True))
    got = cpp.backward(g_y, x, A, B, 0.5, (True, True, True), isa=isa)
    close(got[0], want[0], "∂x")
    for name, gs, ws in (("A", got[1], want[1]), ("B", got[2], want[2])):
        assert len(gs) == len(ws)
        for i, (a, b) in enumerate(zip(gs, ws)):
            close(a, b, f"∂{name}[{i}]")
    close(cpp.forward(x, A, B, 0.5, isa=isa), reference.forward(x.double(), [t.double() for t in A],
                                                                [t.double() for t in B], 0.5), "y")


def test_independent_of_thread_count():
    g = torch.Generator().manual_seed(5)
    x, g_y = torch.randn(700, 256, generator=g), torch.randn(700, 256, generator=g)
    A, B = torch.randn(1, 16, 16, generator=g), torch.randn(1, 16, 16, generator=g)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append((OPS._cpp_kron_linear(x, A, B, 1.0, -1),
                            *OPS._cpp_kron_linear_backward(g_y, x, A, B, 1.0, True, True, True, -1)))
    finally:
        torch.set_num_threads(threads)
    for res in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(res, results[0]))


def test_public_op_autograd_dispatch():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, 64, generator=g)
    A = torch.randn(8, 8, generator=g)
    B = (torch.randn(8, 2, generator=g), torch.randn(2, 8, generator=g))
    grads = {}
    for backend, dtype in (("cpp", torch.float32), ("reference", torch.float64)):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (x, A, *B)]
        with use_backend(backend):
            y = svdkernels.kron_linear(leaves[0], leaves[1], (leaves[2], leaves[3]), scale=0.5)
            y.square().sum().backward()
        grads[backend] = [y.detach()] + [t.grad for t in leaves]
    for name, got, want in zip(("y", "∂x", "∂A", "∂Bu", "∂Bv"), grads["cpp"], grads["reference"]):
        close(got, want, name)
    with use_backend("cpp"), pytest.raises(RuntimeError, match="float32"):
        svdkernels.kron_linear(x.double(), A.double(), B[0].double() @ B[1].double())
    assert cpp.cpp_supports(x) and not cpp.cpp_supports(x.bfloat16())


def test_internal_ops_contract():
    x, A, B = torch.randn(4, 12), torch.randn(1, 3, 3), torch.randn(1, 2, 4)
    with pytest.raises(ValueError, match="isa"):
        OPS._cpp_kron_linear(x, A, B, 1.0, OPS._cpp_best_isa() + 1)
    with pytest.raises(TypeError, match="x: expected dtype float32"):
        OPS._cpp_kron_linear(x.double(), A, B, 1.0, -1)
    with pytest.raises(ValueError, match="a2\\*b2"):
        OPS._cpp_kron_linear(torch.randn(4, 13), A, B, 1.0, -1)
    with pytest.raises(ValueError, match="same number r"):
        OPS._cpp_kron_linear(x, A, B.repeat(2, 1, 1), 1.0, -1)
    with pytest.raises(ValueError, match="grad_y"):
        OPS._cpp_kron_linear_backward(torch.randn(4, 5), x, A, B, 1.0, True, True, True, -1)
    assert OPS._cpp_kron_linear(x[:0], A, B, 1.0, -1).shape == (0, 6)
    gx, gA, gB = OPS._cpp_kron_linear_backward(torch.randn(0, 6), x[:0], A, B, 1.0, True, True, True, -1)
    assert gx.shape == (0, 12) and bool((gA == 0).all()) and bool((gB == 0).all())
