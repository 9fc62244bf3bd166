"""Regressions found by tests/fuzz/test_fuzz_train.py in LowRankAdamW (issue 13)."""
import copy

import pytest
import torch
from torch import nn

from svdkernels.testing.errors import assert_raises_naming
from svdkernels.train import LowRankAdamW, lowrank_param_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def stepped(projector="svd"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    opt = LowRankAdamW(lowrank_param_groups(model, rank=2), projector=projector, update_gap=2)
    model(torch.randn(3, 6)).square().sum().backward()
    opt.step()
    return model, opt


@pytest.mark.parametrize("entry, value, exc, words", [
    ("basis", "zeros", TypeError, ["basis", "tensor", "str"]),  # was accepted; the next step failed inside the op
    ("exp_avg", None, TypeError, ["exp_avg", "tensor", "NoneType"]),
    ("step", -1, ValueError, ["step", "int >= 0", "-1"]),
    ("step", "3", ValueError, ["step", "'3'"]),
    ("next_refresh", 1.5, ValueError, ["next_refresh", "1.5"]),
    ("gap", 0, ValueError, ["gap", "int >= 1"]),
    ("cosines", [float("nan")], ValueError, ["cosines", "finite"]),
])
def test_load_state_dict_checks_every_entry_and_changes_nothing(entry, value, exc, words):
    _, opt = stepped()
    sd = copy.deepcopy(opt.state_dict())
    pid = next(i for i, s in sd["state"].items() if "basis" in s)
    sd["state"][pid][entry] = value
    before = copy.deepcopy(opt.state_dict())
    assert_raises_naming(lambda: opt.load_state_dict(sd), exc, ["state_dict", *words])
    after = opt.state_dict()
    for i, s in before["state"].items():
        for k, v in s.items():
            assert torch.equal(v, after["state"][i][k]) if isinstance(v, torch.Tensor) else v == after["state"][i][k]


def test_random_basis_seed_must_be_an_int():
    _, opt = stepped("random")
    sd = copy.deepcopy(opt.state_dict())
    pid = next(i for i, s in sd["state"].items() if "basis_seed" in s)
    sd["state"][pid]["basis_seed"] = None
    assert_raises_naming(lambda: opt.load_state_dict(sd), ValueError, ["state_dict", "basis_seed", "None"])


def test_a_valid_state_still_loads():
    model, opt = stepped()
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    model(torch.randn(3, 6)).square().sum().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("kw", [{"lr": float("inf")}, {"weight_decay": float("inf")}, {"scale": float("inf")},
                                {"eps": float("inf")}, {"lr": 1e39}])
def test_hyper_parameters_must_be_finite_float32(kw):
    """Were accepted: lr/weight_decay/scale = inf made every weight inf or NaN after one
    finite step, lr = 1e300 failed inside torch ("cannot be converted to type float")."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    name = next(iter(kw))
    assert_raises_naming(lambda: LowRankAdamW(lowrank_param_groups(model, rank=2), **kw), ValueError,
                         [name, "expected a value in [0.0, 3.4"])


@pytest.mark.parametrize("key, value, exc", [("lr", float("inf"), ValueError), ("lr", -1.0, ValueError),
                                             ("eps", "1e-8", TypeError), ("weight_decay", float("nan"), ValueError),
                                             ("betas", (0.9, 1.0), ValueError), ("betas", 0.9, TypeError)])
def test_a_param_group_s_own_options_are_checked(key, value, exc):
    """torch.optim.Optimizer checks no group option: an lr=inf group trained to inf weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    groups = lowrank_param_groups(model, rank=2)
    groups[1][key] = value
    assert_raises_naming(lambda: LowRankAdamW(groups), exc, ["param_groups[1]", key])
