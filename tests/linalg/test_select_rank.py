"""select_rank: energy threshold and elbow criteria on batches of spectra."""
import pytest
import torch

from svdkernels import select_rank


def test_energy_threshold_counts_squared_singular_values():
    S = torch.tensor([3.0, 2.0, 1.0, 0.5])  # energies 9, 4, 1, 0.25 of 14.25
    assert select_rank(S, energy=9 / 14.25).item() == 1
    assert select_rank(S, energy=0.64).item() == 2
    assert select_rank(S, energy=0.95).item() == 3
    assert select_rank(S, energy=1.0).item() == 4


def test_elbow_of_a_sharp_knee():
    S = torch.tensor([10.0, 9.0, 8.0, 1.0, 0.9, 0.8, 0.7, 0.6])
    assert select_rank(S, elbow=True).item() == 4  # up to the first point past the drop


def test_batched_and_both_criteria_take_the_larger():
    S = torch.stack([torch.tensor([10.0, 9.0, 8.0, 1.0, 0.9, 0.8]), torch.tensor([5.0, 1.0, 0.5, 0.4, 0.3, 0.2])])
    e = select_rank(S, energy=0.5)
    b = select_rank(S, elbow=True)
    both = select_rank(S, energy=0.5, elbow=True)
    assert both.shape == (2,) and both.dtype == torch.int64
    assert torch.equal(both, torch.maximum(e, b))


def test_max_rank_and_no_criterion():
    S = torch.linspace(1, 0.1, 10)
    assert select_rank(S).item() == 10
    assert select_rank(S, energy=1.0, max_rank=3).item() == 3


def test_zero_spectrum_keeps_one():
    assert select_rank(torch.zeros(5), energy=0.9).item() == 1


@pytest.mark.parametrize(
    "kwargs,exc,word",
    [
        (dict(S=torch.tensor([1, 2])), TypeError, "S"),
        (dict(S=torch.zeros(0)), ValueError, "S"),
        (dict(S=torch.ones(3), energy=1.5), ValueError, "energy"),
        (dict(S=torch.ones(3), max_rank=0), ValueError, "max_rank"),
        (dict(S=torch.tensor([1.0, -1.0])), ValueError, "non-negative"),
    ],
    ids=["int", "empty", "energy", "max_rank", "negative"],
)
def test_bad_input(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        select_rank(**kwargs)
