"""KronLinear: SoKA and LoKr initialisations, forward through kron_linear, merge."""
import pytest
import torch
from torch import nn

import svdkernels
from svdkernels.adapters import KronLinear, near_square_factors
from svdkernels.testing.errors import assert_raises_naming

torch.manual_seed(0)


def linear(out_f=48, in_f=40, bias=True, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


@pytest.mark.parametrize("dim", [1, 2, 7, 12, 64, 96, 127, 384, 1536, 4096, 11008])
@pytest.mark.parametrize("factor", [-1, 4, 8])
def test_factor_split_matches_peft(dim, factor):
    lokr = pytest.importorskip("peft.tuners.lokr.layer")
    assert near_square_factors(dim, factor) == lokr.factorization(dim, factor)


def test_default_shapes_are_peft_lokr_split():
    layer = KronLinear(linear(96, 64), init="lokr")
    assert layer.a_shape == (8, 8) and layer.b_shape == (12, 8)


@pytest.mark.parametrize("bias", [True, False])
def test_soka_init_leaves_outputs_unchanged(bias):
    base = linear(bias=bias)
    x = torch.randn(5, 40)
    want = base(x)
    W = base.weight.detach().clone()
    layer = KronLinear(base, a_shape=(6, 5), b_shape=(8, 8), rank=3, seed=0)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)  # fp32 rounding of W - Σ
    # The base now holds the residual; the adapter the principal Kronecker terms.
    sigma, _, _ = svdkernels.kpsvd(W, (6, 5), (8, 8), rank=3, seed=0)
    torch.testing.assert_close(layer.delta_weight().norm(), sigma.norm(), rtol=1e-5, atol=0)
    assert not base.weight.requires_grad
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"A", "B"}


def test_soka_rank_by_energy_and_elbow():
    base = linear(64, 64)
    with torch.no_grad():  # two dominant Kronecker terms on top of the random weight
        base.weight += 5 * torch.kron(torch.randn(8, 8), torch.randn(8, 8))
        base.weight += 3 * torch.kron(torch.randn(8, 8), torch.randn(8, 8))
    layer = KronLinear(linear(64, 64), a_shape=(8, 8), b_shape=(8, 8), energy=0.5)
    assert 1 <= layer.num_terms < 64
    elbow = KronLinear(base, a_shape=(8, 8), b_shape=(8, 8), elbow=True)
    assert elbow.num_terms <= 4


def test_lokr_init_starts_at_zero_delta_and_trains():
    base = linear()
    x = torch.randn(5, 40)
    want = base(x).detach()
    layer = KronLinear(base, init="lokr", rank=2, b_rank=2, seed=0)
    torch.testing.assert_close(layer(x), want)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"A", "B_u", "B_v"}
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    target = torch.randn(5, 48)
    losses = []
    for _ in range(5):
        loss = (layer(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(base.weight, linear().weight)  # the frozen base never moved


def test_gradients_equal_those_of_the_dense_delta():
    layer = KronLinear(linear(), init="lokr", rank=2, seed=0)
    with torch.no_grad():
        layer.A.normal_()
    x = torch.randn(7, 40, requires_grad=True)
    layer(x).square().sum().backward()
    A, B = layer.A.detach().clone().requires_grad_(), layer.B.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    W = sum(torch.kron(a, b) for a, b in zip(A, B))
    (layer.base(x2) + x2 @ W.T).square().sum().backward()
    for got, want in ((layer.A.grad, A.grad), (layer.B.grad, B.grad), (x.grad, x2.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 0)])
def test_merge_unmerge_round_trip(dtype, tol):
    base = linear(dtype=dtype)
    W0 = base.weight.detach().clone()
    layer = KronLinear(base, init="lokr", rank=2, seed=0)
    with torch.no_grad():
        layer.A.normal_()
    x = torch.randn(4, 40, dtype=dtype)
    before = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), before, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=5e-2 if dtype == torch.bfloat16 else 1e-5)
    merged = base.weight.detach().float().clone()
    layer.unmerge()
    # W + Δ and then − Δ each round once to the weight dtype: per entry at most a
    # unit roundoff u of |W + Δ| and of |W| (u = 2^-8 for bf16, 2^-24 for fp32).
    u = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -24
    bound = u * (merged.abs() + W0.float().abs()) * 1.01 + tol
    assert ((base.weight.float() - W0.float()).abs() <= bound).all()


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda: KronLinear(linear(), a_shape=(6, 5), b_shape=(8, 7), rank=1), ValueError, ["a_shape, b_shape", "40"]),
        (lambda: KronLinear(nn.Conv1d(2, 2, 1)), TypeError, ["base", "Conv1d"]),
        (lambda: KronLinear(linear(), init="pissa"), ValueError, ["init", "pissa"]),
        (lambda: KronLinear(linear(), a_shape=(6, 5)), ValueError, ["a_shape, b_shape", "both"]),
        (lambda: KronLinear(linear(), init="lokr", rank=0), ValueError, ["rank", "0"]),
        (lambda: KronLinear(linear(), b_rank=2), ValueError, ["a_rank, b_rank", "lokr"]),
        (lambda: KronLinear.from_factors(linear(), torch.randn(6, 5), torch.randn(2, 8, 8)), ValueError, ["A, B", "1", "2"]),
    ],
    ids=["shape-mismatch", "not-linear", "bad-init", "one-shape", "rank0", "lowrank-soka", "terms-mismatch"],
)
def test_bad_input_names_the_argument(call, exc, words):
    assert_raises_naming(call, exc, words)
