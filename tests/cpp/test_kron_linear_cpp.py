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


# (N, r, a1, a2, b1, b2, k): remainders in every tile; LoKr's default (32x32, w2 of rank 8).
LOWRANK_B_SHAPES = [(37, 2, 5, 7, 6, 9, 3), (70, 1, 32, 32, 32, 32, 8), (19, 3, 16, 8, 24, 40, 5)]


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES.get)
@pytest.mark.parametrize("shape", LOWRANK_B_SHAPES, ids=str)
def test_lowrank_b_against_float64(isa, shape):
    """B = Bu·Bv through the rank: y and (∂x, ∂A, ∂Bu, ∂Bv) against float64 autograd of
    the dense map, and every subset of gradients gives the same values."""
    N, r, a1, a2, b1, b2, k = shape
    g = torch.Generator().manual_seed(N + k)
    x, g_y = torch.randn(N, a2 * b2, generator=g), torch.randn(N, a1 * b1, generator=g)
    A = torch.randn(r, a1, a2, generator=g)
    Bu, Bv = torch.randn(r, b1, k, generator=g), torch.randn(r, k, b2, generator=g)
    leaves = [t.double().requires_grad_(True) for t in (x, A, Bu, Bv)]
    W = sum(torch.kron(leaves[1][i], leaves[2][i] @ leaves[3][i]) for i in range(r))
    y64 = 0.75 * leaves[0] @ W.T
    y64.backward(g_y.double())
    close(OPS._cpp_kron_linear_lowrank_b(x, A, Bu, Bv, 0.75, isa), y64.detach(), "y")
    got = OPS._cpp_kron_linear_lowrank_b_backward(g_y, x, A, Bu, Bv, 0.75, True, True, True, isa)
    for name, t, leaf in zip(("∂x", "∂A", "∂Bu", "∂Bv"), got, leaves):
        close(t, leaf.grad, name)
    for needs in ((True, False, False), (False, True, False), (False, False, True), (False, True, True)):
        part = OPS._cpp_kron_linear_lowrank_b_backward(g_y, x, A, Bu, Bv, 0.75, *needs, isa)
        for want, t, need in zip(got, part, (needs[0], needs[1], needs[2], needs[2])):
            assert torch.equal(t, want) if need else t.numel() == 0


def test_lowrank_b_independent_of_thread_count():
    g = torch.Generator().manual_seed(6)
    x, g_y = torch.randn(700, 256, generator=g), torch.randn(700, 256, generator=g)
    A, Bu, Bv = torch.randn(1, 16, 16, generator=g), torch.randn(1, 16, 4, generator=g), torch.randn(1, 4, 16, generator=g)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append((OPS._cpp_kron_linear_lowrank_b(x, A, Bu, Bv, 1.0, -1),
                            *OPS._cpp_kron_linear_lowrank_b_backward(g_y, x, A, Bu, Bv, 1.0, True, True, True, -1)))
    finally:
        torch.set_num_threads(threads)
    for res in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(res, results[0]))


def test_lowrank_b_chosen_only_where_cheaper():
    """LoKr's rank-8 w2 of a 32x32 factor goes through the rank; a rank that costs more
    than the dense product is composed, and both routes agree."""
    A = [torch.randn(1, 32, 32)]
    assert cpp.use_lowrank_b(A, [torch.randn(1, 32, 8), torch.randn(1, 8, 32)])
    assert not cpp.use_lowrank_b(A, [torch.randn(1, 32, 24), torch.randn(1, 24, 32)])
    assert not cpp.use_lowrank_b(A, [torch.randn(1, 32, 32)])
    g = torch.Generator().manual_seed(8)
    x, g_y = torch.randn(40, 1024, generator=g), torch.randn(40, 1024, generator=g)
    B = [torch.randn(1, 32, 8, generator=g), torch.randn(1, 8, 32, generator=g)]
    dense = [B[0] @ B[1]]
    close(cpp.forward(x, A, B, 0.5), OPS._cpp_kron_linear(x, A[0], dense[0], 0.5, -1).double(), "y")
    gx, _, gB = cpp.backward(g_y, x, A, B, 0.5, (True, False, True))
    gx_dense, _, gB_dense = OPS._cpp_kron_linear_backward(g_y, x, A[0], dense[0], 0.5, True, False, True, -1)
    close(gx, gx_dense.double(), "∂x")
    close(gB[0], (gB_dense @ B[1].transpose(1, 2)).double(), "∂Bu")
    close(gB[1], (B[0].transpose(1, 2) @ gB_dense).double(), "∂Bv")


def test_lowrank_b_internal_ops_contract():
    x, A = torch.randn(4, 12), torch.randn(1, 3, 3)
    Bu, Bv = torch.randn(1, 2, 1), torch.randn(1, 1, 4)
    with pytest.raises(ValueError, match="Bu, Bv"):
        OPS._cpp_kron_linear_lowrank_b(x, A, Bu, torch.randn(1, 2, 4), 1.0, -1)
    with pytest.raises(TypeError, match="Bv: expected dtype float32"):
        OPS._cpp_kron_linear_lowrank_b(x, A, Bu, Bv.double(), 1.0, -1)
    with pytest.raises(ValueError, match="a2\\*b2"):
        OPS._cpp_kron_linear_lowrank_b(torch.randn(4, 13), A, Bu, Bv, 1.0, -1)
    with pytest.raises(ValueError, match="grad_y"):
        OPS._cpp_kron_linear_lowrank_b_backward(torch.randn(4, 5), x, A, Bu, Bv, 1.0, True, True, True, -1)
    assert OPS._cpp_kron_linear_lowrank_b(x[:0], A, Bu, Bv, 1.0, -1).shape == (0, 6)
    gx, gA, gBu, gBv = OPS._cpp_kron_linear_lowrank_b_backward(torch.randn(0, 6), x[:0], A, Bu, Bv, 1.0, True, True,
                                                               True, -1)
    assert gx.shape == (0, 12) and all(bool((t == 0).all()) and t.shape == s.shape
                                       for t, s in ((gA, A), (gBu, Bu), (gBv, Bv)))


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES.get)
@pytest.mark.parametrize("lowrank", [False, True], ids=["dense B", "low-rank B"])
def test_in_place_ops_add_to_their_target(isa, lowrank):
    """_cpp_kron_linear_add_ / _backward_add_ add exactly what the out-of-place ops return."""
    g = torch.Generator().manual_seed(11)
    N, a1, a2, b1, b2 = 45, 6, 5, 7, 9
    x, g_y = torch.randn(N, a2 * b2, generator=g), torch.randn(N, a1 * b1, generator=g)
    A = torch.randn(2, a1, a2, generator=g)
    B = [torch.randn(2, b1, 3, generator=g), torch.randn(2, 3, b2, generator=g)] if lowrank else \
        [torch.randn(2, b1, b2, generator=g)]
    Bv = B[1] if lowrank else None
    if lowrank:
        y_want = OPS._cpp_kron_linear_lowrank_b(x, A, B[0], Bv, 0.5, isa)
        gx_want, *grads_want = OPS._cpp_kron_linear_lowrank_b_backward(g_y, x, A, B[0], Bv, 0.5, True, True, True, isa)
    else:
        y_want = OPS._cpp_kron_linear(x, A, B[0], 0.5, isa)
        gx_want, *grads_want = OPS._cpp_kron_linear_backward(g_y, x, A, B[0], 0.5, True, True, True, isa)
    y0, gx0 = torch.randn(N, a1 * b1, generator=g), torch.randn(N, a2 * b2, generator=g)
    y, gx = y0.clone(), gx0.clone()
    OPS._cpp_kron_linear_add_(y, x, A, B[0], Bv, 0.5, isa)
    grads = OPS._cpp_kron_linear_backward_add_(gx, g_y, x, A, B[0], Bv, 0.5, True, True, isa)
    close(y - y0, y_want.double(), "y")
    close(gx - gx0, gx_want.double(), "∂x")
    for got, want in zip(grads, grads_want):
        assert torch.equal(got, want)
    if not lowrank:
        assert grads[2].numel() == 0
    with pytest.raises(ValueError, match="y: expected a contiguous"):
        OPS._cpp_kron_linear_add_(y.T.contiguous(), x, A, B[0], Bv, 0.5, isa)
    with pytest.raises(ValueError, match="gx: expected a contiguous"):
        OPS._cpp_kron_linear_backward_add_(gx[:-1], g_y, x, A, B[0], Bv, 0.5, True, True, isa)


@pytest.mark.parametrize("lowrank", [False, True], ids=["dense B", "low-rank B"])
def test_linear_kron_one_node_matches_the_sum(lowrank):
    """linear_kron on float32 CPU tensors is one _LinearKron node whose output and every
    gradient (x, weight, bias, factors; any subset) match F.linear + kron_linear in float64."""
    from svdkernels.ops.kron_linear import linear_kron

    g = torch.Generator().manual_seed(12)
    x = torch.randn(3, 7, 8 * 6, generator=g)
    W, b = torch.randn(5 * 4, 48, generator=g), torch.randn(20, generator=g)
    A = torch.randn(2, 5, 8, generator=g)
    B = (torch.randn(2, 4, 2, generator=g), torch.randn(2, 2, 6, generator=g)) if lowrank else \
        torch.randn(2, 4, 6, generator=g)
    flat = [x, W, b, A, *(B if lowrank else [B])]
    g_y = torch.randn(3, 7, 20, generator=g)  # the same upstream gradient in both dtypes
    for trainable in ((True, True, True, True), (False, False, False, True), (True, False, True, False)):
        grads = {}
        for dtype in (torch.float32, torch.float64):
            leaves = [t.detach().to(dtype, copy=True).requires_grad_(trainable[min(i, 3)]) for i, t in enumerate(flat)]
            Bf = tuple(leaves[4:]) if lowrank else leaves[4]
            if dtype == torch.float32:
                y = linear_kron(leaves[0], leaves[1], leaves[2], leaves[3], Bf, scale=0.7)
                assert type(y.grad_fn).__name__ == "_LinearKronBackward"
            else:  # the composition, on the reference backend
                with use_backend("reference"):
                    y = torch.nn.functional.linear(leaves[0], leaves[1], leaves[2]) + \
                        svdkernels.kron_linear(leaves[0], leaves[3], Bf, scale=0.7)
            (y * g_y.to(dtype)).sum().backward()
            grads[dtype] = [y.detach()] + [t.grad for t in leaves]
        for i, (got, want) in enumerate(zip(grads[torch.float32], grads[torch.float64])):
            if want is None:
                assert got is None, i
            else:
                close(got, want, f"output {i}")
    with pytest.raises(ValueError, match="weight: expected shape"):
        linear_kron(x, W[:, :-1], b, A, B)


def test_kron_linear_layer_takes_one_node_unless_hooked():
    from svdkernels.adapters import KronLinear

    torch.manual_seed(0)
    layer = KronLinear(torch.nn.Linear(64, 64), init="lokr", rank=2, b_rank=2, scale=0.5)
    torch.nn.init.normal_(layer.A)  # a nonzero delta
    x = torch.randn(5, 64, requires_grad=True)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "_LinearKronBackward"
    seen = []
    handle = layer.base.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    y_hooked = layer(x)
    handle.remove()
    assert len(seen) == 1 and type(y_hooked.grad_fn).__name__ != "_LinearKronBackward"
    close(y_hooked.detach(), y.detach().double(), "y")
    close(seen[0], torch.nn.functional.linear(x, layer.base.weight, layer.base.bias).detach().double(), "base")
