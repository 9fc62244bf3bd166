"""Issue 12: select_rank refuses spectra whose rank would be meaningless."""
from __future__ import annotations

import math

import pytest
import torch

from svdkernels.linalg import select_rank
from svdkernels.testing.errors import assert_raises_naming


@pytest.mark.parametrize("S,words", [
    (torch.tensor([3.0, math.nan, 1.0]), ["S", "finite", "NaN"]),
    (torch.tensor([math.inf, 2.0, 1.0]), ["S", "finite", "inf"]),
    (torch.tensor([1.0, 2.0, 3.0]), ["S", "descending", "ascending"]),
    (torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0]]), ["S", "descending"]),
    (torch.tensor([3.0, -1.0]), ["S", "non-negative", "-1"]),
], ids=["nan", "inf", "ascending", "one-unsorted-row", "negative"])
@pytest.mark.parametrize("kw", [dict(energy=0.9), dict(elbow=True), dict()], ids=["energy", "elbow", "neither"])
def test_bad_spectra_name_S(S, words, kw):
    assert_raises_naming(lambda: select_rank(S, **kw), ValueError, words)


def test_bad_settings():
    S = torch.tensor([3.0, 2.0, 1.0])
    assert_raises_naming(lambda: select_rank(S, energy=math.nan), ValueError, ["energy", "nan"])
    assert_raises_naming(lambda: select_rank(S, energy=True), ValueError, ["energy", "True"])
    assert_raises_naming(lambda: select_rank(S, elbow=1), TypeError, ["elbow", "bool", "int"])
    assert_raises_naming(lambda: select_rank(S.to("meta"), energy=0.5), ValueError, ["S", "meta"])


def test_ties_and_zeros_are_fine():
    S = torch.tensor([[2.0, 2.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert select_rank(S, energy=0.5).tolist() == [1, 2]
    assert select_rank(torch.zeros(3, 5), energy=1.0).tolist() == [1, 1, 1]
