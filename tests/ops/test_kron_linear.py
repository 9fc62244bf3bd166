"""kron_linear: against the materialised Kronecker product, gradients, contract, memory."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import svdkernels
from svdkernels.reference import kron_linear as ref
from svdkernels.testing.errors import assert_raises_naming

torch.manual_seed(0)


def dense_kron(A, B) -> torch.Tensor:
    """Σ_i A_i ⊗ B_i materialised: the oracle this op must never build."""
    A = A if isinstance(A, torch.Tensor) else A[0] @ A[1]
    B = B if isinstance(B, torch.Tensor) else B[0] @ B[1]
    A, B = (t.unsqueeze(0) if t.dim() == 2 else t for t in (A, B))
    return sum(torch.kron(a, b) for a, b in zip(A, B))


def rand(*shape, dtype=torch.float64, grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


# (r, a1, a2, b1, b2): non-square, non-power-of-two, r = 1 and r > 1, degenerate 1s.
SHAPES = [(1, 4, 4, 8, 8), (3, 3, 5, 6, 7), (2, 1, 6, 5, 1), (1, 7, 2, 3, 9)]


@pytest.mark.parametrize("r,a1,a2,b1,b2", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("lead", [(5,), (2, 3), ()], ids=["N5", "B2xT3", "unbatched"])
def test_forward_matches_materialised_kron(r, a1, a2, b1, b2, lead):
    x, A, B = rand(*lead, a2 * b2), rand(r, a1, a2), rand(r, b1, b2)
    y = svdkernels.kron_linear(x, A, B, scale=0.7)
    assert y.shape == (*lead, a1 * b1)
    torch.testing.assert_close(y, 0.7 * x @ dense_kron(A, B).T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 6], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("r", [1, 2])
def test_lowrank_factors(k, r):
    # k = 1 takes the two-thin-GEMMs path for B (4k(p+q) <= pq), k = 2, 6 compose it.
    a1, a2, b1, b2 = 3, 4, 8, 9
    x = rand(7, a2 * b2)
    A = (rand(r, a1, k), rand(r, k, a2))
    B = (rand(r, b1, k), rand(r, k, b2))
    assert ref._apply_lowrank_first([B[0], B[1]]) == (k == 1)
    y = svdkernels.kron_linear(x, A, B, scale=1.3)
    torch.testing.assert_close(y, 1.3 * x @ dense_kron(A, B).T, rtol=1e-12, atol=1e-12)


def test_two_dim_factors_mean_one_term():
    x, A, B = rand(4, 12), rand(3, 4), rand(5, 3)
    torch.testing.assert_close(svdkernels.kron_linear(x, A, B), x @ torch.kron(A, B).T)


@pytest.mark.parametrize("r,a1,a2,b1,b2", SHAPES[:2], ids=lambda v: str(v))
def test_gradcheck_dense(r, a1, a2, b1, b2):
    x, A, B = rand(3, a2 * b2, grad=True), rand(r, a1, a2, grad=True), rand(r, b1, b2, grad=True)
    assert torch.autograd.gradcheck(lambda x, A, B: svdkernels.kron_linear(x, A, B, scale=0.5), (x, A, B))


@pytest.mark.parametrize("k", [1, 4])
def test_gradcheck_lowrank(k):
    r, a1, a2, b1, b2 = 2, 3, 4, 5, 6
    args = (rand(2, 3, a2 * b2, grad=True), rand(r, a1, k, grad=True), rand(r, k, a2, grad=True),
            rand(r, b1, k, grad=True), rand(r, k, b2, grad=True))
    fn = lambda x, au, av, bu, bv: svdkernels.kron_linear(x, (au, av), (bu, bv), scale=2.0)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)


def test_gradients_only_where_asked():
    x, A, B = rand(3, 12), rand(1, 2, 3, grad=True), rand(1, 2, 4)
    svdkernels.kron_linear(x, A, B).sum().backward()
    assert A.grad is not None and x.grad is None and B.grad is None


@pytest.mark.parametrize("dtype,tol", [
    (torch.float32, 1e-5),   # fp32 GEMMs over sums of ~100 terms
    (torch.bfloat16, 2e-2),  # the intermediate Z is rounded to bf16 (8-bit mantissa)
])
def test_low_precision_against_float64(dtype, tol):
    x, A, B = torch.randn(16, 8 * 12), torch.randn(2, 10, 8), torch.randn(2, 9, 12)
    want = x.double() @ dense_kron(A.double(), B.double()).T
    got = svdkernels.kron_linear(x.to(dtype), A.to(dtype), B.to(dtype))
    assert got.dtype == dtype
    err = (got.double() - want).norm() / want.norm()
    assert err < tol, err


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns inside the block."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("lowrank", [False, True])
def test_never_forms_the_kronecker_product(lowrank):
    # d = 1024 with 32x32 factors: W has 1M entries; 4 tokens of activations 4K.
    N, r, a, k = 4, 2, 32, 4
    x = rand(N, a * a, dtype=torch.float32, grad=True)
    A = rand(r, a, a, dtype=torch.float32, grad=True)
    B = (rand(r, a, k, dtype=torch.float32, grad=True), rand(r, k, a, dtype=torch.float32, grad=True)) \
        if lowrank else rand(r, a, a, dtype=torch.float32, grad=True)
    with _LargestTensor() as probe:
        y = svdkernels.kron_linear(x, A, B)
        y.square().sum().backward()
    # Bound: the activations times r (the intermediate Z) or a factor, never W.
    assert probe.largest <= max(N * a * a * r, r * a * a), probe.largest
    assert probe.largest < (a * a) ** 2 // 64


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda: svdkernels.kron_linear(torch.randn(2, 12), torch.randn(2, 3, 4), torch.randn(3, 5, 3)),
         ValueError, ["A, B", "r = 2", "3"]),
        (lambda: svdkernels.kron_linear(torch.randn(2, 13), torch.randn(3, 4), torch.randn(5, 3)),
         ValueError, ["x", "a2*b2", "12", "13"]),
        (lambda: svdkernels.kron_linear(torch.ones(2, 12, dtype=torch.int64), torch.randn(3, 4), torch.randn(5, 3)),
         TypeError, ["x", "torch.int64"]),
        (lambda: svdkernels.kron_linear(torch.randn(2, 12), torch.randn(3, 4).double(), torch.randn(5, 3)),
         TypeError, ["A", "torch.float32", "torch.float64"]),
        (lambda: svdkernels.kron_linear(torch.randn(2, 12), [1.0], torch.randn(5, 3)),
         TypeError, ["A", "pair"]),
        (lambda: svdkernels.kron_linear(torch.randn(2, 12), torch.randn(3), torch.randn(5, 3)),
         ValueError, ["A", "2-D", "3-D"]),
        (lambda: svdkernels.kron_linear(torch.randn(2, 12), (torch.randn(3, 2), torch.randn(3, 4)), torch.randn(5, 3)),
         ValueError, ["A", "do not chain"]),
        (lambda: svdkernels.kron_linear(torch.randn(2, 12), torch.randn(3, 4), torch.randn(5, 3), scale="2"),
         TypeError, ["scale", "str"]),
        (lambda: torch.ops.svdkernels.kron_linear(torch.randn(2, 12), [torch.randn(1, 4, 4)], [torch.randn(1, 5, 3)],
                                                  float("nan")),
         ValueError, ["scale", "finite", "nan"]),
    ],
    ids=["r-mismatch", "in-features", "int-x", "dtype-mismatch", "bad-factor", "1d-factor", "no-chain", "scale",
         "nan-scale-through-the-op"],
)
def test_bad_input_names_the_argument(call, exc, words):
    assert_raises_naming(call, exc, words)


def test_opcheck():
    x = torch.randn(3, 4, 20, requires_grad=True)
    A = [torch.randn(2, 3, 4, requires_grad=True)]
    B = [torch.randn(2, 1, 2, requires_grad=True), torch.randn(2, 2, 5, requires_grad=True)]
    torch.library.opcheck(torch.ops.svdkernels.kron_linear.default, (x, A, B, 0.5))
    g = torch.randn(3, 4, 3 * 1)
    torch.library.opcheck(torch.ops.svdkernels.kron_linear_backward.default,
                          (g, x.detach(), [t.detach() for t in A], [t.detach() for t in B], 0.5, True, True, False))


def test_torch_compile_fullgraph_forward_and_backward():
    x = torch.randn(6, 20)
    A = torch.randn(2, 3, 4, requires_grad=True)
    B = torch.randn(2, 6, 5, requires_grad=True)

    def f(x, A, B):
        return torch.nn.functional.gelu(svdkernels.kron_linear(x, A, B, scale=0.25)).sum()

    compiled = torch.compile(f, fullgraph=True)
    want = torch.autograd.grad(f(x, A, B), (A, B))
    got = torch.autograd.grad(compiled(x, A, B), (A, B))
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("lowrank", [False, True])
def test_triton_backend_through_the_op(lowrank):
    # The fused kernel behind the op (interpreted on the CPU), forward and backward,
    # against the reference backend.
    pytest.importorskip("triton")
    torch.manual_seed(2)
    x = torch.randn(2, 5, 4 * 6, requires_grad=True)
    A = torch.randn(2, 3, 4, requires_grad=True)
    B = (torch.randn(2, 7, 2, requires_grad=True), torch.randn(2, 2, 6, requires_grad=True)) if lowrank \
        else torch.randn(2, 7, 6, requires_grad=True)
    params = [x, A, *(B if lowrank else [B])]
    results = {}
    for backend in ("reference", "triton"):
        with svdkernels.use_backend(backend):
            y = svdkernels.kron_linear(x, A, B, scale=0.5)
            grads = torch.autograd.grad(y.square().sum(), params)
        results[backend] = (y.detach(), grads)
    (y_ref, g_ref), (y_tri, g_tri) = results["reference"], results["triton"]
    torch.testing.assert_close(y_tri, y_ref, rtol=1e-5, atol=1e-5)  # 3xTF32 vs fp32 GEMMs
    for got, want in zip(g_tri, g_ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lowrank", [False, True])
def test_token_chunks_match_one_pass(monkeypatch, lowrank):
    # Large inputs run in token chunks (Z stays in cache); force that on a small one,
    # with a chunk size that does not divide the token count.
    monkeypatch.setattr(ref, "_CHUNK_ELEMENTS", 3 * 4 * 2 * 9)
    r, a1, a2, b1, b2 = 2, 5, 4, 9, 8
    x, A = rand(11, a2 * b2, grad=True), rand(r, a1, a2, grad=True)
    B = (rand(r, b1, 1, grad=True), rand(r, 1, b2, grad=True)) if lowrank else rand(r, b1, b2, grad=True)
    params = [x, A, *(B if lowrank else [B])]
    assert max(1, ref._CHUNK_ELEMENTS // (a2 * r * b1)) == 3
    y = svdkernels.kron_linear(x, A, B, scale=0.3)
    want = 0.3 * x @ dense_kron(A, B).T
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    # Backward runs in chunks too (of 2 tokens here): gradients against the oracle's.
    g = torch.randn_like(y)
    for got, exp in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-12)
