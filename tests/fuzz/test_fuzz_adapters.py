"""Fuzz: adapt (every method), SVDLinear.from_parts, AdaLoRABudget."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from fuzz_support import fuzz, numbers, run_case, values
from svdkernels.adapters import ALL_METHODS, AdaLoRABudget, KronLinear, SVDLinear, adapt
from svdkernels.adapters.adapt import _KRON_OPTIONS
from svdkernels.adapters.methods import METHODS, method_options

pytestmark = pytest.mark.usefixtures("one_thread")

ADAPT_ARGS = {"model", "method", "rank", "targets", "calib_batches", "alpha", "seed", "modules_to_save",
              *_KRON_OPTIONS, *(o for m in METHODS for o in method_options(m)), "base", "W", "salt_rank"}
PRESERVING = {m for m, spec in METHODS.items() if spec.preserves_output} | {"soka"}


@st.composite
def adapt_case(draw):
    bad = draw(st.sampled_from([None] * 6 + ["rank", "alpha", "typo", "option", "weight", "targets", "bare",
                                             "seed", "method"]))
    method = draw(st.sampled_from(ALL_METHODS)) if bad != "method" else draw(st.sampled_from(["loha", 3, None]))
    width = [draw(st.integers(3, 10)) for _ in range(3)]
    dtype = draw(st.sampled_from((torch.float32, torch.float32, torch.bfloat16)))
    torch.manual_seed(draw(st.integers(0, 100)))
    model = nn.Sequential(nn.Linear(width[0], width[1]), nn.Tanh(), nn.Linear(width[1], width[2]))
    finite = True
    mags = (1.0, 1e-3, 1e3, 1e-30) if dtype == torch.float32 else (1.0, 1e-3, 1e3)
    for layer in (model[0], model[2]):
        W, f = draw(values(tuple(layer.weight.shape), special=bad == "weight", magnitudes=mags))
        with torch.no_grad():
            layer.weight.copy_(W)
        finite = finite and f
    model = model.to(dtype)
    if bad == "bare":
        model = model[0]
    kw: dict = {"rank": draw(st.integers(1, 3))}
    if bad == "rank":
        kw["rank"] = draw(st.sampled_from([0, -1, 11, 1.5, True, None]))
    if draw(st.booleans()) or bad == "alpha":
        kw["alpha"] = draw(st.floats(0.5, 8)) if bad != "alpha" else draw(numbers(st.floats(0.5, 8)))
    if bad == "typo":
        kw[draw(st.sampled_from(["gama", "rnak", "alhpa", "energi", "colour"]))] = 1.0
    if bad == "option" and isinstance(method, str) and method in ALL_METHODS:
        opts = list(method_options(method)) if method != "soka" else ["energy", "scale", "elbow"]
        if opts:
            kw[draw(st.sampled_from(opts))] = draw(st.sampled_from([math.nan, -1.0, math.inf, "x", None, 2**70]))
    if bad == "targets":
        kw["targets"] = draw(st.sampled_from([["nope"], 3, r"\d"]))
    if bad == "seed":
        kw["seed"] = draw(st.sampled_from([-1, 2**64, 1.5]))
    if method in ("corda", "eva"):
        kw["calib_batches"] = [torch.randn(6, width[0], dtype=dtype)]
    return model, method, kw, finite


@fuzz(40)
@given(adapt_case())
def test_adapt(case):
    model, method, kw, finite = case
    original = copy.deepcopy(model)
    x = torch.randn(4, model[0].in_features if isinstance(model, nn.Sequential) else model.in_features,
                    dtype=next(model.parameters()).dtype)
    # An unknown keyword is named by the error itself (with the nearest valid one).
    out = run_case("adapt", lambda: adapt(model, method, **kw), ADAPT_ARGS | set(kw), finite_input=finite)
    if not out.ok:
        # A rejected call leaves the model as it was.
        for (n, a), (_, b) in zip(original.state_dict().items(), model.state_dict().items()):
            assert torch.equal(a, b) or (a.isnan() & b.isnan()).any(), n
        return
    adapted = out.value
    layers = [m for m in adapted.modules() if isinstance(m, (SVDLinear, KronLinear))]
    assert layers, "adapt returned a model with no adapter layer (a bare layer unused?)"
    # Only adapter parameters train.
    for m in adapted.modules():
        if type(m) is nn.Linear:
            assert not any(p.requires_grad for p in m.parameters())
    if method in PRESERVING and finite and x.dtype == torch.float32:
        with torch.no_grad():
            y0, y = original(x).double(), adapted(x).double()
        assert bool(torch.isfinite(y).all())
        # Outputs unchanged at init, relative to the layer's scale (fp32 rsvd and residual).
        err = float((y - y0).abs().max()) / (float(y0.abs().max()) + 1e-300)
        assert err < 1e-3, (method, err)


@fuzz(30)
@given(st.data())
def test_svd_linear_from_parts(data):
    r, i, o = data.draw(st.integers(0, 3)), data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))
    bad = data.draw(st.sampled_from([None] * 3 + ["A", "B", "weight", "E", "N", "scaling", "method", "trainable",
                                                  "typo", "removed"]))
    A = torch.randn(r, i + (1 if bad == "A" else 0)) if bad != "A" or data.draw(st.booleans()) else "A"
    B = torch.randn(o, r + (1 if bad == "B" else 0))
    kw = dict(weight=torch.randn(o, i + (1 if bad == "weight" else 0)), bias=None, A=A, B=B)
    if bad == "E":
        kw["E"] = torch.randn(r + 1)
    if bad == "N":
        kw["N"] = torch.randn(r, r + 1)
    if bad == "scaling":
        kw["scaling"] = data.draw(numbers(st.floats(0.5, 2)))
    if bad == "trainable":
        kw["trainable"] = data.draw(st.sampled_from([("nope",), "lora_A", (3,)]))
    if bad == "typo":
        kw["scalling"] = 1.0
    if bad == "removed":
        kw["removed"] = (torch.randn(o, 2), torch.randn(3, i))
    method = "lora" if bad != "method" else "pisa"
    out = run_case("SVDLinear.from_parts", lambda: SVDLinear.from_parts(method, **kw),
                   ["method", "weight", "bias", "A", "B", "scaling", "E", "N", "trainable", "removed", "salt",
                    "config", "scalling", "A, B"], finite_input=True)
    if out.ok:
        y = out.value(torch.randn(2, i))
        assert y.shape == (2, o)


@fuzz(15)
@given(st.data())
def test_adalora_budget(data):
    model = adapt(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), "adalora", rank=4)
    kw = dict(target_rank=data.draw(st.integers(-1, 5)), total_steps=data.draw(st.integers(-1, 20)))
    for name in ("tinit", "tfinal", "delta_t"):
        if data.draw(st.booleans()):
            kw[name] = data.draw(st.integers(-1, 5))
    if data.draw(st.booleans()):
        kw["beta1"] = data.draw(numbers(st.floats(0, 0.99)))
    run_case("AdaLoRABudget", lambda: AdaLoRABudget(model, **kw),
             ["model", "target_rank", "total_steps", "tinit", "tfinal", "delta_t", "beta1", "beta2"],
             finite_input=True)
