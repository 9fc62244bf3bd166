"""Fuzz: the trainer layer (issue 13): LowRankAdamW and its presets (constructor, param
groups, gradients, load_state_dict), lowrank_param_groups, layerwise, Int8Linear,
OrthogonalSubspace, LOST, RankDecay, FedSVD, BA-LoRA, the kind/soma adapters and the
op lowrank_adam_step (through its public entry, whatever backend runs it)."""
from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import svdkernels
from fuzz_support import FLOAT_DTYPES, fuzz, numbers, run_case, values
from svdkernels.ops.lowrank_adam_step import quantize_basis
from svdkernels.reference.lowrank_adam_step import lowrank_adam_step as reference_step
from svdkernels.train import (
    DCTAdamW,
    FedSVD,
    GaLoreAdamW,
    Int8Linear,
    LowRankAdamW,
    LowRankSparseLinear,
    OrthogonalSubspace,
    QGaLoreAdamW,
    RankDecay,
    balora_loss,
    fedsvd_aggregate,
    layerwise,
    lost_init,
    lowrank_param_groups,
)

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIMIZERS = (LowRankAdamW, GaLoreAdamW, QGaLoreAdamW, DCTAdamW)
OPT_ARGS = {"params", "lr", "betas", "eps", "weight_decay", "rank", "update_gap", "scale", "projector", "moments",
            "adaptive_gap", "proj_bits", "stagger", "seed", "side", "skip_nonfinite", "stochastic_rounding",
            "process_group", "param_groups", "state_dict"}
# The optimiser names the parameter whose gradient or weight is at fault ("parameter 'l1.weight': ...",
# "parameter param_groups[0]['params'][1] (shape [4, 3]): ..."): that is its `params` argument.
_PARAMETER = re.compile(r"^parameter ('[^']*'|param_groups\[\d+\]\['params'\]\[\d+\] \(shape \[[\d, ]*\]\)): ")
# "param_groups[0]['rank']: ..." names the group option; fuzz_support's pattern takes one subscript.
_GROUP_KEY = re.compile(r"^param_groups\[\d+\]\['\w+'\]: ")


def as_params_error(call):
    """``call`` with an optimiser error that names a parameter re-worded to start with
    ``params:`` (the oracle wants an argument name first)."""
    def run():
        try:
            return call()
        except (ValueError, TypeError) as e:
            if _PARAMETER.match(str(e)):
                raise type(e)(f"params: {e}") from e
            if _GROUP_KEY.match(str(e)):
                raise type(e)(f"param_groups: {e}") from e
            raise
    return run


def mlp(draw, dtype=torch.float32) -> nn.Sequential:
    widths = [draw(st.integers(2, 6)) for _ in range(3)]
    torch.manual_seed(draw(st.integers(0, 50)))
    return nn.Sequential(nn.Linear(widths[0], widths[1]), nn.Tanh(), nn.Linear(widths[1], widths[2])).to(dtype)


def set_grads(draw, model: nn.Module, special: bool) -> bool:
    finite = True
    for p in model.parameters():
        g, f = draw(values(tuple(p.shape), p.dtype, special=special, magnitudes=(1.0, 1e-3, 1e3, 1e-20)))
        p.grad = g
        finite = finite and f
    return finite


# --------------------------------------------------------------------- LowRankAdamW


@st.composite
def optimizer_case(draw):
    bad = draw(st.sampled_from([None] * 12 + ["lr", "betas", "eps", "weight_decay", "rank", "update_gap", "scale",
                                             "projector", "moments", "proj_bits", "side", "seed", "flag",
                                             "group_rank", "proj_type", "names", "bias_lowrank", "dtype"]))
    cls = draw(st.sampled_from(OPTIMIZERS))
    dtype = draw(st.sampled_from((torch.float32, torch.float32, torch.bfloat16)))
    model = mlp(draw, dtype)
    rank = draw(st.integers(1, 2))
    kw: dict = {"lr": draw(st.floats(1e-4, 1e-1)), "update_gap": draw(st.integers(1, 3))}
    if cls is not QGaLoreAdamW:
        kw["projector"] = draw(st.sampled_from(["svd", "rsvd", "dct", "random"]))
    kw["moments"] = draw(st.sampled_from(["keep", "rotate", "reset"]))
    kw["side"] = draw(st.sampled_from([None, "left", "right"]))
    kw["weight_decay"] = draw(st.sampled_from([0.0, 0.1]))
    kw["skip_nonfinite"] = draw(st.booleans())
    kw["stochastic_rounding"] = draw(st.booleans())
    if bad in ("lr", "eps", "weight_decay", "scale"):
        kw[bad] = draw(numbers(st.floats(0.1, 1)))
    elif bad == "betas":
        kw["betas"] = draw(st.sampled_from([(0.9,), (1.0, 0.999), (0.9, math.nan), (-0.1, 0.9), "ab", (0.9, "x")]))
    elif bad in ("rank", "update_gap", "seed"):
        kw[bad] = draw(st.sampled_from([0, -1, 1.5, True, None, "2"]))
    elif bad == "projector":
        kw["projector"] = draw(st.sampled_from(["SVD", "qr", None, 3]))
    elif bad == "moments":
        kw["moments"] = draw(st.sampled_from(["kept", None, 0]))
    elif bad == "proj_bits":
        kw["proj_bits"] = draw(st.sampled_from([8, 4, 0, "4"]))
    elif bad == "side":
        kw["side"] = draw(st.sampled_from(["top", 1, True]))
    elif bad == "flag":
        kw[draw(st.sampled_from(["stagger", "skip_nonfinite", "stochastic_rounding", "adaptive_gap"]))] = \
            draw(st.sampled_from([1, "yes", None]))
    groups = lowrank_param_groups(model, rank=rank)
    if bad == "group_rank":
        groups[0]["rank"] = draw(st.sampled_from([0, 7, 1.0, None]))
    elif bad == "proj_type":
        groups[0]["proj_type"] = draw(st.sampled_from(["both", None]))
    elif bad == "names":
        groups[0]["names"] = draw(st.sampled_from([["a"], "ab", [1, 2]]))
    elif bad == "bias_lowrank":
        groups[1]["rank"] = 1  # biases are 1-D
    elif bad == "dtype":
        model[0].weight.data = model[0].weight.data.double()
    return cls, model, groups, kw, bad


@fuzz(40)
@given(optimizer_case(), st.data())
def test_lowrank_adamw(case, data):
    """Bad options and groups raise named errors; a built optimiser steps to finite weights
    from finite gradients, names (or skips) a non-finite one, and a ``state_dict`` saved
    after a step resumes to bit-identical weights."""
    cls, model, groups, kw, bad = case
    out = run_case(f"{cls.__name__}()", as_params_error(lambda: cls(groups, **kw)), OPT_ARGS, finite_input=True)
    if bad is None:
        assert out.ok, out.error
    if not out.ok:
        return
    opt = out.value
    finite = set_grads(data.draw, model, special=data.draw(st.booleans()))
    before = copy.deepcopy(model.state_dict())
    stepped = run_case(f"{cls.__name__}.step", as_params_error(opt.step), OPT_ARGS, finite_input=finite)
    if not finite:
        # Named (raised) or skipped: either way nothing changed.
        assert stepped.ok == kw["skip_nonfinite"]
        for n, t in model.state_dict().items():
            assert torch.equal(t, before[n]), n
        return
    assert stepped.ok
    saved = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)
    twin_opt = cls(lowrank_param_groups(twin, rank=groups[0]["rank"]), **kw)
    twin_opt.load_state_dict(saved)
    set_grads(data.draw, model, special=False)
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()
    opt.step()
    twin_opt.step()
    for (n, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.isfinite(a).all(), n
        assert torch.equal(a, b), f"{n}: resumed optimiser differs"


@fuzz(25)
@given(st.data())
def test_load_state_dict(data):
    """A corrupted state (a wrong shape or dtype, a missing group, a foreign type) is
    refused with a named error and leaves the optimiser as it was."""
    model = mlp(data.draw)
    cls = data.draw(st.sampled_from(OPTIMIZERS))
    kw = {"update_gap": 2} | ({} if cls is QGaLoreAdamW else
                              {"projector": data.draw(st.sampled_from(["svd", "rsvd", "dct", "random"]))})
    opt = cls(lowrank_param_groups(model, rank=1), **kw)
    set_grads(data.draw, model, special=False)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    what = data.draw(st.sampled_from(["shape", "dtype", "groups", "type", "params", "rank", "value", "id",
                                      "step"]))
    state = sd["state"]
    pid = data.draw(st.sampled_from(sorted(state)))
    key = data.draw(st.sampled_from(sorted(k for k, v in state[pid].items() if isinstance(v, torch.Tensor))))
    if what == "shape":
        state[pid][key] = torch.zeros(*state[pid][key].shape[:-1], state[pid][key].shape[-1] + 1,
                                      dtype=state[pid][key].dtype)
    elif what == "dtype":
        state[pid][key] = state[pid][key].to(torch.float64)
    elif what == "groups":
        sd["param_groups"] = sd["param_groups"][:1]
    elif what == "type":
        sd = data.draw(st.sampled_from([[sd], None, "state"]))
    elif what == "params":
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:1]
    elif what == "rank":
        sd["param_groups"][0]["rank"] = 2
    elif what == "value":
        state[pid][key] = data.draw(st.sampled_from(["zeros", 3, None]))
    elif what == "id":
        state[99] = dict(state[pid])
    elif what == "step":
        state[pid]["step"] = data.draw(st.sampled_from([-1, "3", None, 1.5]))
    mine = copy.deepcopy(opt.state_dict())
    out = run_case(f"{cls.__name__}.load_state_dict", lambda: opt.load_state_dict(sd), OPT_ARGS,
                   finite_input=True)
    assert not out.ok, f"corrupted state ({what}) was accepted"
    after = opt.state_dict()
    for p_id, st_ in mine["state"].items():
        for k, v in st_.items():
            w = after["state"][p_id][k]
            assert (torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w), (what, k)
