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
_GROUP_KEY = re.compile(r"^param_groups\[\d+\]\['\w+'\](\[\d\])?: ")


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
    # Half the cases good (a flag drawn first: hypothesis' own choice among 20 kinds is far from uniform).
    bad = None if draw(st.booleans()) else draw(st.sampled_from(["lr", "betas", "eps", "weight_decay", "rank", "update_gap", "scale",
                                             "projector", "moments", "proj_bits", "side", "seed", "flag",
                                             "group_rank", "proj_type", "names", "bias_lowrank", "dtype",
                                             "group_option"]))
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
    elif bad == "group_option":  # a group's own AdamW option
        key = draw(st.sampled_from(["lr", "eps", "weight_decay", "betas"]))
        groups[draw(st.integers(0, 1))][key] = draw(numbers(st.floats(0.1, 0.5))) if key != "betas" else \
            draw(st.sampled_from([(0.9, math.inf), (1.0, 0.9), 0.9, (0.9, "x")]))
    return cls, model, groups, kw, bad


@fuzz(60)
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


# --------------------------------------------------------------------- lowrank_adam_step (op)


@fuzz(40)
@given(st.data())
def test_lowrank_adam_step_op(data):
    """The public op against the float64-free reference on copies: shapes, dtypes, packed
    int4 bases, sides, hyper-parameters; bad ones raise naming the argument."""
    m, n = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    side = data.draw(st.sampled_from(["right", "left"] * 4 + ["up", None]))
    right = side != "left"
    k = n if right else m
    r = data.draw(st.integers(1, max(1, min(m, n))))
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES))
    bad = data.draw(st.sampled_from([None] * 12 + ["G_shape", "G_dtype", "P_shape", "P_dtype", "r", "packed",
                                                  "scale", "moments", "moment_dtype", "betas", "eps", "step",
                                                  "sr", "W_dtype", "W_dim"]))
    W, fw = data.draw(values((m, n), dtype, special=False, magnitudes=(1.0, 1e-3, 1e3)))
    G, fg = data.draw(values((m, n) if bad != "G_shape" else (m + 1, n), dtype,
                             special=data.draw(st.booleans()), magnitudes=(1.0, 1e-3, 1e3)))
    if bad == "G_dtype":
        G = G.to(torch.float64)
    P = torch.linalg.qr(torch.randn(k, r + (1 if bad == "r" else 0)))[0].T.contiguous()  # [r, k] orthonormal rows
    if bad == "r" and P.shape[0] <= min(m, n):
        P = torch.randn(min(m, n) + 1, k)
    P_scale = P_zero = None
    packed = data.draw(st.booleans())
    if packed:
        P, P_scale, P_zero = quantize_basis(P.unsqueeze(0))
        P, P_scale, P_zero = P[0], P_scale[0], P_zero[0]
        if bad == "packed":
            P = torch.zeros(P.shape[0], P.shape[1] + 1, dtype=torch.uint8)
        if bad == "scale":
            which = data.draw(st.sampled_from(["none", "dtype", "shape"]))
            P_scale = None if which == "none" else P_scale.double() if which == "dtype" else P_scale[:, :0]
    elif bad == "scale":
        P_scale = torch.ones(P.shape[0], 1)
    if bad == "P_shape":
        P = P[:, :-1] if P.shape[1] > 1 else torch.zeros(P.shape[0], 3)
    if bad == "P_dtype":
        P = P.to(torch.float16) if not packed else P.to(torch.int8)
    rr = P.shape[0]
    shape_m = (m, rr) if right else (rr, n)
    m1 = torch.zeros(shape_m if bad != "moments" else (shape_m[0] + 1, shape_m[1]))
    m2 = torch.rand(shape_m)
    if bad == "moment_dtype":
        m2 = m2.to(torch.bfloat16)
    betas = (0.9, 0.999) if bad != "betas" else data.draw(st.sampled_from([(1.0, 0.9), (0.9,), (0.9, -0.1),
                                                                           ("a", 0.9)]))
    eps = 1e-8 if bad != "eps" else data.draw(st.sampled_from([-1.0, "1e-8", None, math.nan, math.inf]))
    step_size = data.draw(st.floats(0.0, 0.1)) if bad != "step" else \
        data.draw(st.sampled_from(["x", None, math.nan, math.inf]))
    sr = data.draw(st.sampled_from([None, None, 7])) if bad != "sr" else data.draw(st.sampled_from([1.5, "7", True]))
    if bad == "W_dtype":
        W = W.to(torch.float64)
    if bad == "W_dim":
        W = W.reshape(-1)
    args = (W, G, P, m1, m2)
    kw = dict(step_size=step_size, side=side, betas=betas, eps=eps, P_scale=P_scale, P_zero=P_zero, sr_seed=sr)
    ref = [t.clone() if isinstance(t, torch.Tensor) else t for t in args]
    out = run_case("lowrank_adam_step", lambda: svdkernels.lowrank_adam_step(*args, **kw),
                   ["W", "G", "P", "exp_avg", "exp_avg_sq", "step_size", "side", "betas", "eps", "decay",
                    "P_scale", "P_zero", "sr_seed", "P_scale, P_zero"],
                   finite_input=fw and fg)
    if bad is None and side in ("right", "left") and (sr is None or W.is_contiguous()):
        assert out.ok, out.error  # (sr_seed keys the rounding by flat index: a strided W is refused)
    if not out.ok or not (fw and fg):
        return
    reference_step(ref[0], ref[1], ref[2], P_scale, P_zero, ref[3], ref[4], right, betas[0], betas[1], eps,
                   step_size, 0.0, sr)
    # A backend may fuse or order the products differently from the reference: fp32 rounding
    # (relative to the tensor's largest entry); half precision: one ulp of W's final rounding.
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for got, want in zip((W, m1, m2), ref[:1] + ref[3:]):
        err = float((got.double() - want.double()).abs().max()) if got.numel() else 0.0
        assert err <= tol * (float(want.double().abs().max()) + 1e-30), err


# --------------------------------------------------------------------- param groups, layerwise


@fuzz(25)
@given(st.data())
def test_lowrank_param_groups_and_layerwise(data):
    model = mlp(data.draw)
    bad = data.draw(st.sampled_from([None] * 5 + ["targets", "rank", "option", "accumulate", "optimizer",
                                                  "foreign"]))
    targets = data.draw(st.sampled_from([None, ["0"], r"\d"]))
    if bad == "targets":
        targets = data.draw(st.sampled_from([3, ["nope"], [1], "x+"]))
    rank = 1 if bad != "rank" else data.draw(st.sampled_from([0, 9, 1.5, "1", None]))
    opts = {} if bad != "option" else {data.draw(st.sampled_from(["update_gap", "scale", "projector"])): -1}
    groups = run_case("lowrank_param_groups", lambda: lowrank_param_groups(model, targets, rank=rank, **opts),
                      ["model", "targets", "rank", *opts], finite_input=True)
    if not groups.ok:
        return
    built = run_case("LowRankAdamW()", as_params_error(lambda: LowRankAdamW(groups.value, update_gap=2)), OPT_ARGS,
                     finite_input=True)
    if not built.ok:
        assert bad in ("rank", "option"), built.error
        return
    opt = built.value
    accumulate = data.draw(st.integers(1, 3)) if bad != "accumulate" else \
        data.draw(st.sampled_from([0, -1, 1.5, True, "2", None]))
    target_model = model if bad != "foreign" else mlp(data.draw)
    target_opt = opt if bad != "optimizer" else torch.optim.AdamW(model.parameters())
    handle = run_case("layerwise", lambda: layerwise(target_model, target_opt, accumulate=accumulate),
                      ["model", "optimizer", "accumulate"], finite_input=True)
    if not handle.ok:
        assert bad in ("accumulate", "foreign", "optimizer"), handle.error
        return
    x = torch.randn(3, model[0].in_features)
    nan_at = data.draw(st.sampled_from([None, 0, 1]))
    skip = data.draw(st.booleans())
    opt.skip_nonfinite = skip
    for i in range(2 * accumulate):
        loss = model(x * (math.nan if i == nan_at else 1.0)).square().sum()
        out = run_case("layerwise (backward)", as_params_error(loss.backward), OPT_ARGS, finite_input=i != nan_at)
        if not out.ok:
            assert i == nan_at and not skip, out.error
            # The abandoned backward leaves nothing behind: the next finite one steps.
            run_case("layerwise (backward after a raise)", model(x).square().sum().backward, OPT_ARGS,
                     finite_input=True)
            assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
            break
    handle.value.remove()
    if nan_at is None or skip:
        assert all(torch.isfinite(p).all() for p in model.parameters())


# --------------------------------------------------------------------- layers


@fuzz(30)
@given(st.data())
def test_int8_linear(data):
    bad = data.draw(st.sampled_from([None] * 3 + ["in", "out", "bias", "linear", "x", "x_dtype", "weight"]))
    i, o = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 8))
    if bad in ("in", "out"):
        v = data.draw(st.sampled_from([0, -1, 1.5, None, True]))
        i, o = (v, o) if bad == "in" else (i, v)
    use_bias = True if bad != "bias" else data.draw(st.sampled_from([1, "yes", None]))
    if data.draw(st.booleans()) or bad in ("in", "out", "bias"):
        out = run_case("Int8Linear()", lambda: Int8Linear(i, o, use_bias),
                       ["in_features", "out_features", "bias", "device", "dtype"], finite_input=True)
        if not out.ok:
            return
        layer = out.value
    else:
        lin = nn.Linear(i, o)
        W, finite = data.draw(values((o, i), special=bad == "weight", magnitudes=(1.0, 1e-3, 1e3, 1e-30)))
        with torch.no_grad():
            lin.weight.copy_(W)
        arg = lin if bad != "linear" else data.draw(st.sampled_from([W, None, nn.Conv1d(1, 1, 1)]))
        out = run_case("Int8Linear.from_linear", lambda: Int8Linear.from_linear(arg), ["linear"],
                       finite_input=finite)
        if not out.ok:
            return
        layer = out.value
    x, fx = data.draw(values((2, layer.in_features + (1 if bad == "x" else 0)), special=False))
    if bad == "x_dtype":
        x = x.to(torch.int32)
    run_case("Int8Linear.forward", lambda: layer(x), ["x", "input"], finite_input=fx)


@fuzz(30)
@given(st.data())
def test_lost(data):
    bad = data.draw(st.sampled_from([None] * 4 + ["in", "out", "rank", "channels", "model", "targets", "weight"]))
    i, o = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    rank = data.draw(st.integers(1, min(i, o)))
    c = data.draw(st.integers(0, i))
    if bad == "rank":
        rank = data.draw(st.sampled_from([0, min(i, o) + 1, 1.5, None]))
    if bad == "channels":
        c = data.draw(st.sampled_from([-1, i + 1, 0.5, None]))
    if data.draw(st.booleans()):
        ii, oo = (data.draw(st.sampled_from([0, -2, 2.0])) if bad == "in" else i,
                  data.draw(st.sampled_from([0, -2, 2.0])) if bad == "out" else o)
        out = run_case("LowRankSparseLinear()", lambda: LowRankSparseLinear(ii, oo, rank, c),
                       ["in_features", "out_features", "rank", "sparse_channels", "bias", "device", "dtype"],
                       finite_input=True)
        if out.ok:
            y = out.value(torch.randn(2, i))
            assert y.shape == (2, o) and torch.isfinite(y).all()
        return
    model = nn.Sequential(nn.Linear(i, o), nn.ReLU())
    W, finite = data.draw(values((o, i), special=bad == "weight", magnitudes=(1.0, 1e-3, 1e3)))
    with torch.no_grad():
        model[0].weight.copy_(W)
    dense = model[0].weight.detach().clone()
    arg = model if bad != "model" else data.draw(st.sampled_from([None, W]))
    targets = None if bad != "targets" else data.draw(st.sampled_from([["x"], 3]))
    out = run_case("lost_init", lambda: lost_init(arg, rank, c, targets=targets),
                   ["model", "rank", "sparse_channels", "targets"], finite_input=finite)
    if out.ok and finite:
        layer = model[0]
        assert isinstance(layer, LowRankSparseLinear)
        # The split keeps the weight where rank + channels cover it: rank = min(m, n) exactly.
        if rank == min(i, o):
            err = float((layer.dense_weight() - dense).abs().max())
            assert err <= 1e-4 * (float(dense.abs().max()) + 1e-30), err


@fuzz(20)
@given(st.data())
def test_rank_decay(data):
    bad = data.draw(st.sampled_from([None] * 6 + ["start_rank", "every", "model", "in_features", "targets",
                                                  "weight"]))
    o = data.draw(st.integers(2, 6))
    i = 64 if bad != "in_features" else 48
    torch.manual_seed(data.draw(st.integers(0, 9)))
    model = nn.Sequential(nn.Linear(i, o), nn.ReLU(), nn.Linear(o, 64) if False else nn.Identity())
    W, finite = data.draw(values((o, i), special=bad == "weight", magnitudes=(1.0, 1e-3, 1e3)))
    with torch.no_grad():
        model[0].weight.copy_(W)
    start = data.draw(st.integers(1, o)) if bad != "start_rank" else data.draw(st.sampled_from([0, o + 1, 1.5, None]))
    every = data.draw(st.integers(1, 3)) if bad != "every" else data.draw(st.sampled_from([0, -1, 2.5, "1"]))
    arg = model if bad != "model" else data.draw(st.sampled_from([None, model[0]]))
    targets = None if bad != "targets" else ["nope"]
    out = run_case("RankDecay()", lambda: RankDecay(arg, start, every, targets=targets),
                   ["model", "start_rank", "every", "targets"], finite_input=finite)
    if not out.ok or not finite:
        return
    sched = out.value
    x = torch.randn(2, i)
    for _ in range(sched.total_steps):
        assert not sched.finished
        assert torch.isfinite(model(x)).all()
        sched.step()
    assert sched.finished, (start, every, sched.total_steps)  # exactly total_steps, as documented


@fuzz(20)
@given(st.data())
def test_orthogonal_subspace(data):
    bad = data.draw(st.sampled_from([None] * 3 + ["model", "rank_fraction", "importance", "min_fraction",
                                                  "max_fraction", "targets", "calib", "weight"]))
    model = mlp(data.draw)
    W, finite = data.draw(values(tuple(model[0].weight.shape), special=bad == "weight"))
    with torch.no_grad():
        model[0].weight.copy_(W)
    kw = {"rank_fraction": data.draw(st.floats(0.1, 0.9))}
    if bad in ("rank_fraction", "min_fraction", "max_fraction"):
        kw[bad] = data.draw(numbers(st.floats(0.1, 0.9)))
    importance = data.draw(st.sampled_from(["uniform", "io_similarity"])) if bad != "importance" else "io"
    targets = None if bad != "targets" else data.draw(st.sampled_from([["nope"], 3]))
    arg = model if bad != "model" else "model"
    args = ["model", "targets", "rank_fraction", "importance", "min_fraction", "max_fraction"]
    out = run_case("OrthogonalSubspace()", lambda: OrthogonalSubspace(arg, targets, importance=importance, **kw),
                   args, finite_input=finite)
    if not out.ok:
        return
    osf = out.value
    x = torch.randn(4, model[0].in_features)
    calib = [x] if bad != "calib" else data.draw(st.sampled_from([[], 3, [None], [torch.randn(4, 99)]]))
    for task in range(2):
        began = run_case("OrthogonalSubspace.begin_task",
                         lambda: osf.begin_task(calib if importance == "io_similarity" else None),
                         ["calib_batches", "optimizer", "model"], finite_input=finite)  # model: held since __init__
        if not began.ok:
            return
        model(x).square().sum().backward()
        ended = run_case("OrthogonalSubspace.end_task", osf.end_task, ["self"], finite_input=finite)
        if not ended.ok:
            return
    if finite:
        assert all(torch.isfinite(t).all() for t in osf.state_dict().values())


@fuzz(25)
@given(st.data())
def test_fedsvd_aggregate(data):
    r, o, i, K = (data.draw(st.integers(1, 3)), data.draw(st.integers(3, 6)), data.draw(st.integers(3, 6)),
                  data.draw(st.integers(1, 3)))
    bad = data.draw(st.sampled_from([None] * 4 + ["A", "B", "B_shape", "B_dtype", "weights", "stacked"]))
    A, fa = data.draw(values((r, i), special=False))
    Bs, fb = [], True
    for _ in range(K):
        B, f = data.draw(values((o, r), special=bad == "B", magnitudes=(1.0, 1e-3, 1e3)))
        Bs.append(B)
        fb = fb and f
    if bad == "A":
        A = data.draw(st.sampled_from([A.to(torch.int64), A[0], "A", torch.randn(9, i)]))
    if bad == "B_shape":
        Bs[-1] = torch.randn(o + 1, r)
    if bad == "B_dtype":
        Bs[-1] = Bs[-1].double()
    weights = None if bad != "weights" else data.draw(st.sampled_from([[1.0] * (K + 1), [math.nan] * K, [0.0] * K,
                                                                      [-1.0] * K, 3, "ab", [True] * K]))
    clients = torch.stack(Bs) if bad == "stacked" else Bs
    out = run_case("fedsvd_aggregate", lambda: fedsvd_aggregate(clients, A, weights=weights),
                   ["B_clients", "A", "weights"], finite_input=fa and fb)
    if out.ok and fa and fb:
        B2, A2 = out.value
        want = torch.stack(Bs).double().mean(0) @ A.double()
        err = float((B2.double() @ A2.double() - want).abs().max())
        assert err <= 1e-4 * (float(want.abs().max()) + 1e-30), err


@fuzz(20)
@given(st.data())
def test_fedsvd(data):
    bad = data.draw(st.sampled_from([None] * 6 + ["mode", "local_steps", "batch_size", "lr", "clip", "noise",
                                                  "seed", "clients", "model"]))
    torch.manual_seed(0)
    model = svdkernels.adapt(nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)), "lora", rank=2)
    clients = [(torch.randn(5, 6), torch.randint(0, 3, (5,))) for _ in range(2)]
    kw: dict = {"local_steps": 1, "batch_size": 4}
    if bad == "mode":
        kw["mode"] = "fedavg"
    elif bad in ("local_steps", "batch_size", "seed"):
        kw[bad] = data.draw(st.sampled_from([0, -1, 1.5, True]))
    elif bad in ("lr", "clip"):
        kw[bad] = data.draw(numbers(st.floats(0.01, 1)))
    elif bad == "noise":
        kw["noise_multiplier"] = data.draw(numbers(st.floats(0.0, 1)))
    elif bad == "clients":
        clients = data.draw(st.sampled_from([[], [(torch.randn(5, 6), torch.randint(0, 3, (4,)))], [torch.randn(5)],
                                             [(torch.full((5, 6), math.nan), torch.zeros(5, dtype=torch.long))],
                                             [(torch.randn(5, 6), torch.zeros(5, dtype=torch.long)),
                                              (torch.randn(5, 7), torch.zeros(5, dtype=torch.long))]]))
    arg = model if bad != "model" else None
    out = run_case("FedSVD()", lambda: FedSVD(arg, clients, **kw),
                   ["model", "clients", "mode", "local_steps", "batch_size", "lr", "clip", "noise_multiplier",
                    "loss_fn", "seed"], finite_input=True)
    if out.ok:
        fit = run_case("FedSVD.fit", lambda: out.value.fit(1), ["rounds", "lr"], finite_input=True)
        if not fit.ok:
            assert "lr" in kw, fit.error  # only a huge step size diverges here
        assert all(torch.isfinite(t).all() for t in out.value.global_state().values())


@fuzz(25)
@given(st.data())
def test_balora_loss(data):
    N, V = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 6))
    bad = data.draw(st.sampled_from([None] * 3 + ["logits", "base", "weights", "top_k", "svd_rank", "norm", "route",
                                                  "special"]))
    dtype = data.draw(st.sampled_from((torch.float32, torch.bfloat16)))
    logits, fl = data.draw(values((2, N, V), dtype, special=bad == "special", magnitudes=(1.0, 10.0, 1e-3)))
    base, fb = data.draw(values((2, N, V), dtype, special=False, magnitudes=(1.0, 10.0)))
    kw: dict = {"top_k": data.draw(st.integers(1, V))}
    if bad == "logits":
        logits = data.draw(st.sampled_from([logits.to(torch.int64), logits[0, 0], None]))
    if bad == "base":
        base = data.draw(st.sampled_from([base[..., :-1] if V > 1 else base[:1], None, base.to(torch.int32)]))
    if bad == "weights":
        kw[data.draw(st.sampled_from(["consistency", "diversity", "svd"]))] = data.draw(numbers(st.floats(0, 2)))
    if bad == "top_k":
        kw["top_k"] = data.draw(st.sampled_from([0, V + 1, 1.5, None]))
    if bad == "svd_rank":
        kw["svd_rank"] = data.draw(st.sampled_from([0, min(N, V) + 1, 1.5, "2"]))
    if bad == "norm":
        kw["norm"] = "spectral"
    if bad == "route":
        kw["route"] = "fast"
    out = run_case("balora_loss", lambda: balora_loss(logits, base, **kw),
                   ["logits", "base_logits", "consistency", "diversity", "svd", "top_k", "svd_rank", "norm", "route",
                    "seed"], finite_input=fl and fb)
    if out.ok:
        assert out.value.dim() == 0


# --------------------------------------------------------------------- kind / soma adapters


@fuzz(25)
@given(st.data())
def test_adapt_kind_soma(data):
    method = data.draw(st.sampled_from(["kind", "soma"]))
    bad = data.draw(st.sampled_from([None] * 4 + ["rank", "tailor_rank", "classes", "freeze_blocks", "typo",
                                                  "weight", "class_ids", "x"]))
    torch.manual_seed(data.draw(st.integers(0, 9)))
    w = data.draw(st.integers(4, 8))
    model = nn.Sequential(nn.Sequential(nn.Linear(w, w), nn.Tanh()), nn.Sequential(nn.Linear(w, w), nn.Tanh()),
                          nn.Linear(w, 4))
    W, finite = data.draw(values((w, w), special=bad == "weight", magnitudes=(1.0, 1e-3, 1e3)))
    with torch.no_grad():
        model[0][0].weight.copy_(W)
    kw: dict = {"rank": data.draw(st.integers(1, 2))}
    if method == "kind":
        kw["classes"] = data.draw(st.integers(1, 2))
        kw["tailor_rank"] = data.draw(st.integers(kw["classes"], 2))
        if bad in ("tailor_rank", "classes"):
            kw[bad] = data.draw(st.sampled_from([0, -1, 1.5, None, 99]))
    else:
        kw["freeze_blocks"] = data.draw(st.integers(0, 2))
        if bad == "freeze_blocks":
            kw["freeze_blocks"] = data.draw(st.sampled_from([-1, 3, [7], True, "1", [0, 1, None]]))
    if bad == "rank":
        kw["rank"] = data.draw(st.sampled_from([0, 9, 1.5, None]))
    if bad == "typo":
        kw["tailors"] = 1
    original = copy.deepcopy(model)
    out = run_case(f"adapt({method})", lambda: svdkernels.adapt(model, method, **kw),
                   ["model", "method", "rank", "targets", "seed", "alpha", "modules_to_save", "tailor_rank",
                    "classes", "freeze_blocks", "tailors"], finite_input=finite)
    if not out.ok:
        for (n, a), b in zip(original.state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b) or bool((a.isnan() & b.isnan()).any()), n
        return
    x = torch.randn(3, w) if bad != "x" else data.draw(st.sampled_from([torch.randn(3, w + 1), torch.randn(w),
                                                                           torch.ones(3, w, dtype=torch.int64)]))
    if method == "kind":
        ids = torch.randint(0, kw["classes"], (3,))
        if bad == "class_ids":
            ids = data.draw(st.sampled_from([None, ids.float(), ids[:2], ids + 5, ids - 10]))
        y = run_case("KindLinear.forward", lambda: out.value[0][0](x, ids), ["class_ids", "x"], finite_input=finite)
        if y.ok and finite:
            with torch.no_grad():
                assert torch.allclose(y.value, original[0][0](x), atol=1e-4 * (1 + float(W.abs().max()))), \
                    "KIND changed the output at init"
    elif finite and bad != "x":
        with torch.no_grad():
            y, y0 = out.value(x), original(x)
        assert torch.allclose(y, y0, atol=1e-3 * (1 + float(y0.abs().max()))), "SoMA changed the output at init"


# --------------------------------------------------------------------- saved states


@fuzz(20)
@given(st.data())
def test_orthogonal_subspace_load_state_dict(data):
    """A corrupted basis state is refused with a named error and changes nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    osf = OrthogonalSubspace(model, importance="uniform")
    osf.begin_task()
    osf.end_task()
    osf.begin_task()
    osf.end_task()
    sd = {k: v.clone() for k, v in osf.state_dict().items()}
    what = data.draw(st.sampled_from(["ok", "key", "type", "dtype", "shape", "rank", "nan", "not_dict"]))
    key = data.draw(st.sampled_from(sorted(sd)))
    if what == "key":
        sd[key + "x"] = sd.pop(key)
    elif what == "type":
        sd[key] = data.draw(st.sampled_from([None, "U", 3]))
    elif what == "dtype":
        sd[key] = sd[key].to(torch.int64)
    elif what == "shape":
        sd[key] = sd[key][:-1]
    elif what == "rank":
        sd = {k: torch.cat([v] * 8, 1) for k, v in sd.items()}
    elif what == "nan":
        sd[key] = sd[key].clone()
        sd[key].view(-1)[0] = math.nan
    elif what == "not_dict":
        sd = data.draw(st.sampled_from([3, list(sd), None]))
    before = {k: v.clone() for k, v in osf.state_dict().items()}
    out = run_case("OrthogonalSubspace.load_state_dict", lambda: osf.load_state_dict(sd), ["state"], finite_input=True)
    assert out.ok == (what == "ok"), what
    if not out.ok:
        assert all(torch.equal(before[k], v) for k, v in osf.state_dict().items()), what


@fuzz(15)
@given(data=st.data())
def test_rank_decay_load(tmp_path_factory, data):
    """A RankDecay file with a corrupted schedule is refused (FormatError names the path)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 4), nn.ReLU())
    rd = RankDecay(model, 4, 2)
    for _ in range(data.draw(st.integers(0, 5))):
        rd.step()
    path = tmp_path_factory.mktemp("rd") / "rd.safetensors"
    rd.save(path)
    with safe_open(str(path), "pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    sched = json.loads(meta["schedule"])
    field = data.draw(st.sampled_from([None, "steps", "rank", "decayed_at", "start_rank"]))
    if field is not None:
        sched[field] = data.draw(st.sampled_from([-1, 99, "x", None, 1.5, [1]]))
    meta["schedule"] = json.dumps(sched)
    save_file(state, str(path), metadata=meta)
    twin = RankDecay(nn.Sequential(nn.Linear(64, 4), nn.ReLU()), 4, 2)
    out = run_case("RankDecay.load", lambda: twin.load(path), ["path"], finite_input=True)
    if out.ok:
        for _ in range(3):  # the loaded schedule runs
            twin.step()


@fuzz(20)
@given(st.data())
def test_annealed_weight_decay(data):
    from svdkernels.adapters.soma import AnnealedWeightDecay

    model = mlp(data.draw)
    opt = torch.optim.AdamW(model.parameters(), weight_decay=0.1)
    bad = data.draw(st.sampled_from([None] * 3 + ["optimizer", "start", "end", "total_steps", "schedule", "groups",
                                                  "state"]))
    kw: dict = {"start": data.draw(st.floats(0, 1)), "total_steps": data.draw(st.integers(1, 5))}
    if bad in ("start", "end"):
        kw[bad] = data.draw(numbers(st.floats(0, 1)))
    if bad == "total_steps":
        kw[bad] = data.draw(st.sampled_from([0, -1, 1.5, None]))
    if bad == "schedule":
        kw[bad] = "step"
    if bad == "groups":
        kw[bad] = data.draw(st.sampled_from([[1], 3, [True], "0", [-1]]))
    arg = opt if bad != "optimizer" else "adamw"
    out = run_case("AnnealedWeightDecay()", lambda: AnnealedWeightDecay(arg, **kw),
                   ["optimizer", "start", "end", "total_steps", "schedule", "groups"], finite_input=True)
    if not out.ok:
        return
    sched = out.value
    for _ in range(kw["total_steps"] + 1):
        v = sched.step()
        assert math.isfinite(v) and v >= 0 and opt.param_groups[0]["weight_decay"] == v
    state = sched.state_dict()
    if bad == "state":
        state = data.draw(st.sampled_from([{}, {"step_count": "x"}, {"step_count": -1}, 3, None]))
    loaded = run_case("AnnealedWeightDecay.load_state_dict", lambda: sched.load_state_dict(state), ["state"],
                      finite_input=True)
    assert loaded.ok == (bad != "state")


@fuzz(15)
@given(st.data())
def test_qgalore_int8(data):
    """QGaLoreAdamW over Int8Linear weights: finite steps stay finite and INT8, a
    non-finite float gradient is named (or skipped) and changes nothing."""
    torch.manual_seed(data.draw(st.integers(0, 9)))
    i, o = data.draw(st.integers(2, 6)), data.draw(st.integers(2, 6))
    model = nn.Sequential(Int8Linear.from_linear(nn.Linear(i, o)), nn.Tanh(), nn.Linear(o, 3))
    skip = data.draw(st.booleans())
    opt = QGaLoreAdamW(lowrank_param_groups(model, rank=1), update_gap=1, skip_nonfinite=skip)
    x, _ = data.draw(values((3, i), special=False))
    nan = data.draw(st.booleans())
    loss = model(x).square().sum()
    loss.backward()
    if nan:
        model[0].qweight.float_grad[0, 0] = math.nan
    before = copy.deepcopy(model.state_dict())
    out = run_case("QGaLoreAdamW.step (Int8Linear)", as_params_error(opt.step), OPT_ARGS, finite_input=not nan)
    assert model[0].qweight.dtype == torch.int8
    if nan:
        assert out.ok == skip
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    else:
        assert all(torch.isfinite(t.float()).all() for t in model.state_dict().values())


@fuzz(25)
@given(data=st.data())
def test_kind_files(tmp_path_factory, data):
    """load_kind on a corrupted save_kind file: FormatError naming the path (or a named
    error), the model unchanged; an intact file rebuilds bit-identical outputs."""
    from svdkernels.adapters import load_kind, save_kind
    from svdkernels.testing.files import rewrite_safetensors

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 5))
    adapted = svdkernels.adapt(copy.deepcopy(base), "kind", rank=2, tailor_rank=2, classes=2)
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(0.1)
    d = tmp_path_factory.mktemp("kind")
    save_kind(adapted, d / "k.safetensors")
    what = data.draw(st.sampled_from(["ok", "shape", "dtype", "nan", "drop", "extra", "meta_json", "meta_layer",
                                      "features", "gate", "no_layer"]))
    key = data.draw(st.sampled_from(["0.kind_U", "0.kind_S", "0.tailor_V", "2.tailor_gate", "2.removed_up"]))
    changed = [what != "ok"]

    def tensors(t):
        if what == "shape":
            t[key] = torch.cat([t[key], t[key][:1]])
        elif what == "dtype":
            t[key] = t[key].to(torch.float64) if t[key].is_floating_point() else t[key].float()
        elif what == "nan":
            if t[key].is_floating_point():
                t[key] = t[key].clone()
                t[key].view(-1)[0] = math.nan
            else:
                changed[0] = False  # a boolean gate holds no NaN: the file is intact
        elif what == "drop":
            t.pop(key)
        elif what == "extra":
            t["9.kind_U"] = torch.zeros(2)
        elif what == "gate":
            t["2.tailor_gate"] = torch.zeros_like(t["2.tailor_gate"])

    def meta(m):
        import json
        layers = json.loads(m["layers"])
        if what == "meta_json":
            m["layers"] = "{"
        elif what == "meta_layer":
            m["layers"] = json.dumps({**layers, "0": "x"})
        elif what == "features":
            layers["0"]["in_features"] = 7
            m["layers"] = json.dumps(layers)
        elif what == "no_layer":
            m["layers"] = json.dumps({"9": layers["0"], "2": layers["2"]})

    path = rewrite_safetensors(d / "k.safetensors", d / "bad.safetensors", tensors=tensors, meta=meta)
    target = copy.deepcopy(base)
    before = copy.deepcopy(target.state_dict())
    out = run_case("load_kind", lambda: load_kind(target, path), ["model", "path"], finite_input=True)
    if not out.ok:
        after = target.state_dict()
        assert set(after) == set(before) and all(torch.equal(v, before[k]) for k, v in after.items()), what
        return
    assert not changed[0], f"a corrupted file ({what}, {key}) was accepted"
    x, ids = torch.randn(3, 6), torch.tensor([0, 1, 0])
    from svdkernels.adapters.kind import kind_classes
    with torch.no_grad(), kind_classes(adapted, ids), kind_classes(out.value, ids):
        assert torch.equal(adapted(x), out.value(x))


# --------------------------------------------------------------------- op findings (fixed in the op by its owner)


def _op_operands():
    g = torch.Generator().manual_seed(0)
    W, G = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    P = torch.linalg.qr(torch.randn(3, 2, generator=g))[0].T.contiguous()
    return W, G, P, torch.zeros(4, 2), torch.zeros(4, 2)


@pytest.mark.parametrize("name, value", [("step_size", math.nan), ("step_size", math.inf), ("eps", math.nan),
                                         ("decay", math.nan), ("decay", math.inf)])
def test_op_refuses_non_finite_hyper_parameters(name, value):
    W, G, P, m, v = _op_operands()
    kw = {"step_size": 1e-3, name: value}
    with pytest.raises(ValueError, match=f"^{name}: "):
        svdkernels.lowrank_adam_step(W, G, P, m, v, **kw)


@pytest.mark.parametrize("betas", [(1.0, 0.9), (0.9, math.nan)])
def test_op_names_betas(betas):
    W, G, P, m, v = _op_operands()
    with pytest.raises(ValueError, match=r"^betas(\[\d\])?: "):
        svdkernels.lowrank_adam_step(W, G, P, m, v, step_size=1e-3, betas=betas)
