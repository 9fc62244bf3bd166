"""kpsvd: the Van Loan–Pitsianis nearest sum of Kronecker products."""
import pytest
import torch

import svdkernels
from svdkernels.linalg.kpsvd import kron_sum, rearrange
from svdkernels.testing.errors import assert_raises_naming

torch.manual_seed(0)


def test_rearrangement_maps_kron_to_rank_one():
    A, B = torch.randn(3, 5), torch.randn(4, 2)
    R = rearrange(torch.kron(A, B), (3, 5), (4, 2))
    torch.testing.assert_close(R, torch.outer(A.reshape(-1), B.reshape(-1)))


@pytest.mark.parametrize("terms", [1, 3])
def test_exact_for_a_sum_of_kronecker_products(terms):
    # Batch of 2 matrices, each an exact sum of `terms` Kronecker products.
    A, B = torch.randn(2, terms, 6, 4), torch.randn(2, terms, 5, 8)
    W = torch.stack([sum(torch.kron(a, b) for a, b in zip(A[i], B[i])) for i in range(2)])
    sigma, Af, Bf = svdkernels.kpsvd(W, (6, 4), (5, 8), rank=terms, seed=0)
    assert sigma.shape == (2, terms) and Af.shape == (2, terms, 6, 4) and Bf.shape == (2, terms, 5, 8)
    err = (kron_sum(sigma, Af, Bf) - W).norm() / W.norm()
    assert err < 1e-5, err  # float32 round-off of a 30x40 SVD
    # Unit-norm factors carry no scale of their own.
    torch.testing.assert_close(Af.flatten(-2).norm(dim=-1), torch.ones(2, terms))
    torch.testing.assert_close(Bf.flatten(-2).norm(dim=-1), torch.ones(2, terms))


@pytest.mark.parametrize("rank", [1, 4, 10])
def test_error_is_the_tail_of_the_rearranged_spectrum(rank):
    W = torch.randn(6 * 5, 4 * 8, dtype=torch.float64)
    S_full = torch.linalg.svdvals(rearrange(W, (6, 4), (5, 8)))
    sigma, A, B = svdkernels.kpsvd(W.float(), (6, 4), (5, 8), rank=rank, seed=1)
    err = (kron_sum(sigma.double(), A.double(), B.double()) - W).norm()
    tail = S_full[rank:].norm()
    assert abs(err / tail - 1) < 2e-3, (err, tail)  # rsvd at default oversampling on a flat spectrum


def test_energy_and_elbow_select_the_rank():
    # Three strong terms and a weak noise floor: the elbow is after 3 terms.
    A, B = torch.randn(3, 8, 8), torch.randn(3, 8, 8)
    W = sum(torch.kron(a, b) * s for a, b, s in zip(A, B, (10.0, 6.0, 4.0)))
    W = W + 1e-3 * torch.randn_like(W)
    s_full = torch.linalg.svdvals(rearrange(W, (8, 8), (8, 8))).double() ** 2
    sigma, _, _ = svdkernels.kpsvd(W, (8, 8), (8, 8), elbow=True)
    # select_rank keeps the points up to and including the knee: the 3 strong
    # terms and the first of the floor.
    assert sigma.shape[-1] == int(svdkernels.select_rank(s_full.sqrt(), elbow=True)) == 4
    energies = sigma[:3].double() ** 2
    sigma90, _, _ = svdkernels.kpsvd(W, (8, 8), (8, 8), energy=0.9)
    k = sigma90.shape[-1]
    assert s_full[:k].sum() >= 0.9 * s_full.sum() and s_full[: k - 1].sum() < 0.9 * s_full.sum()
    assert torch.allclose(energies, s_full[:3].to(energies.dtype), rtol=1e-4)


def test_batched_selection_pads_with_zero_terms():
    A, B = torch.randn(2, 4, 4), torch.randn(2, 4, 4)
    W1 = torch.kron(A[0], B[0])
    W2 = torch.kron(A[0], B[0]) + torch.kron(A[1], B[1])
    sigma, Af, Bf = svdkernels.kpsvd(torch.stack([W1, W2]), (4, 4), (4, 4), energy=0.999999)
    assert sigma.shape == (2, 2)
    assert sigma[0, 1] == 0 and Af[0, 1].abs().max() == 0 and sigma[1, 1] > 0


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda: svdkernels.kpsvd(torch.randn(12, 12), (3, 4), (5, 3), rank=1), ValueError, ["a_shape, b_shape", "12 x 12"]),
        (lambda: svdkernels.kpsvd(torch.randn(12, 12), (3, 3), (4, 4), rank=20), ValueError, ["rank", "[1, 9]", "20"]),
        (lambda: svdkernels.kpsvd(torch.randn(12, 12), (3, 3), (4, 4)), ValueError, ["rank, energy, elbow"]),
        (lambda: svdkernels.kpsvd(torch.ones(12, 12, dtype=torch.int32), (3, 3), (4, 4), rank=1), TypeError, ["W", "int32"]),
        (lambda: svdkernels.kpsvd(torch.randn(12, 12), (3, 0), (4, 4), rank=1), ValueError, ["a_shape", "positive"]),
        (lambda: svdkernels.kpsvd(torch.full((12, 12), float("nan")), (3, 3), (4, 4), rank=1), ValueError, ["W", "finite"]),
    ],
    ids=["shape-mismatch", "rank-too-big", "no-criterion", "int", "zero-dim", "nan"],
)
def test_bad_input_names_the_argument(call, exc, words):
    assert_raises_naming(call, exc, words)
