"""layerwise after a non-finite gradient raised (found by tests/fuzz/test_fuzz_train.py):
the abandoned backward leaves no gradient behind, so the next backward steps as if it
were the first (before the fix the NaN gradient stayed in ``.grad`` and every later
backward raised again; a held shape group's gradients were added to the next pass's)."""
import copy
import math

import pytest
import torch
from torch import nn

from svdkernels.train import LowRankAdamW, layerwise, lowrank_param_groups

pytestmark = pytest.mark.usefixtures("one_thread")


class TwoSame(nn.Module):
    """Two [4, 4] weights: one shape group, refreshed together (b's gradient arrives first)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("poisoned", ["a", "b"])  # a: b is held when a's NaN arrives; b: nothing held yet
def test_next_backward_after_a_raise_equals_a_fresh_start(poisoned):
    torch.manual_seed(0)
    model = TwoSame()
    twin = copy.deepcopy(model)
    handles = [layerwise(m, LowRankAdamW(lowrank_param_groups(m, rank=1), update_gap=1, projector="svd"))
               for m in (model, twin)]
    x = torch.randn(3, 4)
    hook = getattr(model, poisoned).weight.register_hook(lambda g: g * math.nan)
    with pytest.raises(ValueError, match=f"'{poisoned}.weight': non-finite gradient"):
        model(x).square().sum().backward()
    hook.remove()
    assert all(p.grad is None for p in model.parameters())
    model(x).square().sum().backward()
    twin(x).square().sum().backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    for h in handles:
        h.remove()
