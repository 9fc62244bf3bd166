"""Fuzz findings in the ops, each kept as a regression test once fixed; an open one is
a strict expected failure naming the owner of the code.

Each case states the contract (a ``ValueError``/``TypeError`` naming the argument, or
the right result). ``strict=True``: the day a fix lands the case passes, the run
fails, and whoever fixed it removes the mark.
"""
from __future__ import annotations

import math

import pytest
import torch

import svdkernels
from fuzz_support import COUNTS, named_arguments
from svdkernels.quant import dequantize_weight, quantize_weight

OPS = "op-level (svdkernels/ops, reference, csrc): issue 12 item for the ops owner"
RSVD = "rsvd (svdkernels/ops/rsvd.py, reference/rsvd.py): issue 12 item for the rsvd owner"


def _raises_named(call, names):
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    got = named_arguments(str(info.value))
    assert got is not None and got & set(names), str(info.value)


def _attention_operands():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 1, 8, generator=g)
    kl, vl = torch.randn(1, 5, 4, generator=g), torch.randn(1, 5, 4, generator=g)
    kb, vb = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    return q, kl, vl, kb, vb


@pytest.mark.parametrize("theta,scaling", [(-1.0, 1.0), (0.0, 1.0), (10000.0, 0.0), (math.nan, 1.0)])
def test_rope_parameters_through_the_op(theta, scaling):
    COUNTS["op regressions: torch.ops.svdkernels.lowrank_attention"] += 1
    q, kl, vl, kb, vb = _attention_operands()
    _raises_named(lambda: torch.ops.svdkernels.lowrank_attention(q, kl, vl, kb, vb, None, True, 0.35, True, theta,
                                                                  scaling, 0, 8), ["rope_theta", "rope_scaling"])


@pytest.mark.parametrize("causal", ["no", "False", 0.5, None])
def test_causal_must_be_a_bool(causal):
    COUNTS["op regressions: lowrank_attention"] += 1
    q, kl, vl, kb, vb = _attention_operands()
    _raises_named(lambda: svdkernels.lowrank_attention(q, kl, vl, kb, vb, causal=causal), ["causal"])


@pytest.mark.parametrize("A_shape,B_shape,K", [((1, 4, 0), (1, 4, 4), 0), ((1, 4, 4), (1, 0, 4), 16),
                                               ((1, 4, 4), (1, 4, 0), 0)], ids=["a2=0", "b1=0", "b2=0"])
def test_kron_linear_zero_size_factor(A_shape, B_shape, K):
    COUNTS["op regressions: kron_linear"] += 1
    x, A, B = torch.randn(3, K), torch.randn(*A_shape), torch.randn(*B_shape)
    try:
        y = svdkernels.kron_linear(x, A, B)
    except (ValueError, TypeError) as e:
        assert named_arguments(str(e)) & {"x", "A", "B"}, str(e)
        return
    want = x @ torch.kron(A[0], B[0]).T
    assert y.shape == want.shape and torch.allclose(y, want)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_w4a16_gradients_of_x_and_L_up(backend):
    COUNTS["op regressions: lowrank_w4a16_linear autograd"] += 1
    if backend == "cpp":
        pytest.importorskip("svdkernels._C")
    g = torch.Generator().manual_seed(0)
    W = torch.randn(32, 64, generator=g)
    qw, s = quantize_weight(W)
    Ld = torch.randn(16, 64, generator=g)
    x = torch.randn(3, 64, generator=g, requires_grad=True)
    Lu = torch.randn(32, 16, generator=g, requires_grad=True)
    with svdkernels.use_backend(backend):
        y = svdkernels.lowrank_w4a16_linear(x, qw, s, L_down=Ld, L_up=Lu)
    gy = torch.randn_like(y)
    y.backward(gy)
    x2, Lu2 = x.detach().clone().requires_grad_(), Lu.detach().clone().requires_grad_()
    (x2 @ dequantize_weight(qw, s, dtype=torch.float32).T + (x2 @ Ld.T) @ Lu2.T).backward(gy)
    assert x.grad is not None and Lu.grad is not None
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(Lu.grad, Lu2.grad)


@pytest.mark.parametrize("case", ["x-meta-rest-cpu", "all-meta-bad-K", "all-meta-bad-rank"])
def test_cpp_meta_kernel(case):
    """No data is read on these paths (meta), so they are safe in this process."""
    COUNTS["op regressions: torch.ops.svdkernels._cpp_lowrank_w4a16_linear"] += 1
    pytest.importorskip("svdkernels._C")
    qw, s = quantize_weight(torch.randn(32, 64))
    x, Ld, Lu = torch.randn(2, 64), torch.randn(16, 64), torch.randn(32, 16)
    if case == "x-meta-rest-cpu":
        args = (x.to("meta"), qw, s, Ld, Lu)
    elif case == "all-meta-bad-K":
        args = (torch.randn(2, 32).to("meta"), qw.to("meta"), s.to("meta"), Ld.to("meta"), Lu.to("meta"))
    else:
        args = (x.to("meta"), qw.to("meta"), s.to("meta"), Ld[:8].to("meta"), Lu[:, :8].to("meta"))
    try:
        y = torch.ops.svdkernels._cpp_lowrank_w4a16_linear(*args, None, -1)
    except (ValueError, TypeError) as e:
        assert named_arguments(str(e)), str(e)
        return
    # Only a consistent call may return, and then on the meta device.
    assert case == "x-meta-rest-cpu" and y.device.type == "meta", (case, y.device)


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan])
def test_quantize_act_smoothing_factors(value):
    COUNTS["op regressions: lowrank_quantize_act"] += 1
    smooth = torch.ones(64)
    smooth[3] = value
    _raises_named(lambda: svdkernels.lowrank_quantize_act(torch.randn(2, 64), smooth, torch.randn(16, 64)),
                  ["smooth"])


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rsvd_non_finite_entry(value, dtype):
    COUNTS["op regressions: rsvd"] += 1
    A = torch.randn(6, 5).to(dtype)
    A[1, 2] = value
    _raises_named(lambda: svdkernels.rsvd(A, 2, seed=0), ["A"])
