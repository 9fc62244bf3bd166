"""``singular_values(A, rtol=...)``: the float32 route, its rounding bound and the
float64 recomputation of the matrices the bound does not certify, against float64
SVDs of all-MiniLM-L6-v2's weights and of random matrices of condition 1e6; and the
lower-triangle Gram both routes share."""
from __future__ import annotations

import pytest
import torch

import svdkernels.analysis.metrics as metrics
from svdkernels.analysis import singular_values
from svdkernels.testing.models import minilm_linear_weights

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def minilm() -> dict[str, torch.Tensor]:
    """Layer 0 and the pooler: every shape (384², 1536×384, 384×1536) and the most
    ill-conditioned kinds (attention weights, condition up to ~1e4)."""
    return {n: w for n, w in minilm_linear_weights().items() if ".layer.0." in n or "pooler" in n}


@pytest.fixture
def routes(monkeypatch) -> list[tuple[torch.dtype, int]]:
    """(dtype, matrices) of every Gram eigenvalue call singular_values makes."""
    calls: list[tuple[torch.dtype, int]] = []
    real = metrics._gram_singular_values

    def spy(A: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        calls.append((dtype, A.reshape(-1, *A.shape[-2:]).shape[0]))
        return real(A, dtype)

    monkeypatch.setattr(metrics, "_gram_singular_values", spy)
    return calls


def with_condition(shape: tuple[int, int], cond: float, seed: int) -> torch.Tensor:
    """float32 ``U·diag(s)·Vᵀ`` with Haar factors and ``s`` log-spaced from 1 to 1/cond."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    p = min(shape)
    U = torch.linalg.qr(torch.randn(m, p, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, p, generator=gen, dtype=torch.float64))[0]
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), p, dtype=torch.float64)
    return ((U * s) @ V.T).float()


def rel_err(got: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    want = torch.linalg.svdvals(A.double())[..., : got.shape[-1]]
    return (got.double() - want).abs() / want


def test_minilm_top10_certified_in_float32(minilm, routes) -> None:
    for name, W in minilm.items():
        routes.clear()
        got = singular_values(W, k=10, rtol=1e-3)
        assert routes == [(torch.float32, 1)], name  # certified: no float64 pass
        assert got.shape == (10,) and got.dtype == torch.float32
        assert float(rel_err(got, W).max()) <= 1e-3, name


def test_rounding_bound_holds_with_margin(minilm) -> None:
    """The bound of each value against its true error, on MiniLM and on condition
    1e6: every true error at most 1/4 of its bound (observed: ~1/40)."""
    cases = list(minilm.values()) + [with_condition(s, 1e6, i) for i, s in enumerate([(384, 384), (200, 500)])]
    for W in cases:
        m, n = W.shape
        S = metrics._gram_singular_values(W, torch.float32)
        err = rel_err(S, W)
        for k in range(1, min(m, n) + 1, 37):
            bound = float(metrics._float32_bound(S, m, n, k))
            assert float(err[:k].max()) <= bound / 4


def test_ill_conditioned_falls_back_to_float64(routes) -> None:
    A = torch.stack([with_condition((96, 80), 1e6, 0), with_condition((96, 80), 3.0, 1)])
    got = singular_values(A, rtol=1e-4)
    # The condition-1e6 tail fails the float32 bound: that matrix alone is redone.
    assert routes == [(torch.float32, 2), (torch.float64, 1)]
    assert float(rel_err(got, A).max()) <= 1e-4
    routes.clear()
    top = singular_values(A, k=5, rtol=1e-4)  # the top values alone are certified
    assert routes == [(torch.float32, 2)]
    assert float(rel_err(top, A).max()) <= 1e-4
    # Without rtol: float64 only, the documented ~1e-6 relative down to ~1e-5·σ1.
    routes.clear()
    exact = singular_values(A)
    assert routes == [(torch.float64, 2)]
    s = torch.linalg.svdvals(A.double())
    keep = s >= 1e-5 * s[..., :1]
    assert float(rel_err(exact, A)[keep].max()) <= 1e-6


def test_rtol_keeps_shapes_and_leading_dims() -> None:
    A = torch.randn(2, 3, 9, 7, generator=torch.Generator().manual_seed(0))
    got = singular_values(A, rtol=1e-3)
    assert got.shape == (2, 3, 7)
    assert float(rel_err(got, A).max()) <= 1e-3
    assert singular_values(A[0, 0], k=2, rtol=1e-2).shape == (2,)


@pytest.mark.parametrize("shape", [(300, 260), (260, 300), (4, 40, 9)], ids=str)
def test_gram_lower_is_the_lower_triangle(shape) -> None:
    A = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    G = metrics.gram_lower(A, torch.float64)
    X = A.double() if shape[-2] >= shape[-1] else A.double().mT
    full = X.mT @ X
    torch.testing.assert_close(G.tril(), full.tril(), rtol=1e-13, atol=1e-12)
    # Above the diagonal blocks: never computed, zero (300 → 4 blocks of 65).
    p = G.shape[-1]
    if p >= 256:
        assert float(G[..., : p // 4, p // 2:].abs().max()) == 0.0


def test_gradient_through_the_exact_route() -> None:
    """A gradient flows as through the full Gram (the lower-block Gram is for values only)."""
    A = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    singular_values(A).double().sum().backward()
    U, _, Vh = torch.linalg.svd(A.detach(), full_matrices=False)
    torch.testing.assert_close(A.grad, U @ Vh, rtol=1e-5, atol=1e-6)  # d(Σσ)/dA = U·Vᵀ


def test_non_finite_input_names_a() -> None:
    A = torch.randn(3, 6, 5)
    A[1, 2, 3] = float("nan")
    for rtol in (None, 1e-3):
        with pytest.raises(ValueError, match="A: expected finite values"):
            singular_values(A, rtol=rtol)


def test_rtol_bad_values() -> None:
    A = torch.randn(4, 5)
    with pytest.raises(TypeError, match="rtol: expected a float or None, got str"):
        singular_values(A, rtol="1e-3")
    with pytest.raises(TypeError, match="rtol: expected a float or None, got bool"):
        singular_values(A, rtol=True)
    for bad in (0.0, 1e-7, 1.0, float("nan")):
        with pytest.raises(ValueError, match=r"rtol: expected a number in \[1e-6, 1\)"):
            singular_values(A, rtol=bad)
