"""layerwise (steps inside backward, with accumulation) and Int8Linear (INT8 weights,
stochastic rounding)."""

import pytest
import torch
from torch import nn

from svdkernels.testing.errors import assert_raises_naming
from svdkernels.train import (
    GaLoreAdamW,
    Int8Linear,
    LowRankAdamW,
    QGaLoreAdamW,
    dequantize_int8,
    layerwise,
    lowrank_param_groups,
    quantize_int8,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 40), nn.GELU(), nn.Linear(40, 8))


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 24, generator=g), torch.randn(16, 8, generator=g)) for _ in range(n)]


@pytest.mark.parametrize("accumulate", [1])  # accumulate > 1: tests/train/test_layerwise_accumulate.py
def test_layerwise_equals_the_normal_step(accumulate):
    data = batches(6)
    normal, lw = mlp(), mlp()
    make = lambda m: GaLoreAdamW(lowrank_param_groups(m, targets=["0", "2"], rank=4, update_gap=2),  # noqa: E731
                                 lr=1e-2, weight_decay=0.01)
    o_normal = make(normal)
    for i, (x, y) in enumerate(data):
        (((normal(x) - y) ** 2).mean() / accumulate).backward()
        if (i + 1) % accumulate == 0:
            o_normal.step()
            o_normal.zero_grad()
    o_lw = make(lw)
    handle = layerwise(lw, o_lw, accumulate=accumulate)
    seen = []
    for x, y in data:
        (((lw(x) - y) ** 2).mean() / accumulate).backward()
        seen.append(sum(p.grad is not None for p in lw.parameters()))
    # No gradient outlives its step.
    assert seen == [0] * 6
    for a, b in zip(lw.parameters(), normal.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # same fp32 math, one matrix per SVD call
    handle.remove()
    x, y = data[0]
    ((lw(x) - y) ** 2).mean().backward()
    assert all(p.grad is not None for p in lw.parameters())  # hooks gone


def test_layerwise_bad_input():
    m = mlp()
    assert_raises_naming(lambda: layerwise(m, torch.optim.AdamW(m.parameters())), TypeError,
                         ["optimizer", "LowRankAdamW", "AdamW"])
    assert_raises_naming(lambda: layerwise(m, LowRankAdamW(m.parameters()), accumulate=0), ValueError,
                         ["accumulate", ">= 1", "0"])
    assert_raises_naming(lambda: layerwise(mlp(1), LowRankAdamW(m.parameters())), ValueError,
                         ["optimizer", "model"])


def test_int8_roundtrip_and_unbiased_rounding():
    torch.manual_seed(2)
    W = torch.randn(6, 300)
    q, s = quantize_int8(W)
    assert q.dtype == torch.int8 and s.shape == (6, 2)
    err = (dequantize_int8(q, s) - W).abs()
    assert (err <= s[:, torch.arange(300) // 256] / 2 + 1e-7).all()
    # Stochastic: deterministic per seed, unbiased over seeds.
    assert torch.equal(quantize_int8(W, sr_seed=3)[0], quantize_int8(W, sr_seed=3)[0])
    mean = torch.stack([dequantize_int8(*quantize_int8(W, sr_seed=i)) for i in range(200)]).mean(0)
    step = s[:, torch.arange(300) // 256]
    assert ((mean - W).abs() <= 0.3 * step).all()  # 200 draws: std <= step/28


def test_int8_linear_forward_and_gradient():
    lin = nn.Linear(20, 7)
    layer = Int8Linear.from_linear(lin)
    x = torch.randn(3, 5, 20, requires_grad=True)
    y = layer(x)
    W = layer.dequantized_weight()
    torch.testing.assert_close(y, x @ W.T + lin.bias)
    y.square().sum().backward()
    x2 = x.detach().requires_grad_()
    (x2 @ W.T + lin.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    g = 2 * (x @ W.T + lin.bias)
    torch.testing.assert_close(layer.qweight.float_grad, g.reshape(-1, 7).T.detach() @ x.detach().reshape(-1, 20))
    assert layer.qweight.grad is None


def test_qgalore_trains_int8_layers():
    torch.manual_seed(3)
    model = nn.Sequential(Int8Linear.from_linear(nn.Linear(24, 40)), nn.GELU(), nn.Linear(40, 8))
    opt = QGaLoreAdamW(lowrank_param_groups(model, targets=["0"], rank=4, update_gap=5), lr=3e-2)
    x, y = batches(1)[0]
    before = model[0].qweight.clone()
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert model[0].qweight.dtype == torch.int8 and not torch.equal(before, model[0].qweight)
    assert model[0].qweight.float_grad is not None and opt.zero_grad() is None
    assert model[0].qweight.float_grad is None
