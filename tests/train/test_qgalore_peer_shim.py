"""The bench's q-galore-torch peer runs against the installed bitsandbytes through a
shim (svdkernels/bench/optim.py, ``_qgalore_class``). The shim must not change what
the peer computes: its plain AdamW parameters step exactly as torch's AdamW, and its
projected ones train, with 8-bit moments where bitsandbytes uses them."""
import pytest
import torch
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")


def _peer():
    pytest.importorskip("q_galore_torch")
    pytest.importorskip("bitsandbytes")
    from svdkernels.bench.optim import _qgalore_class

    return _qgalore_class()


def test_unshimmed_peer_fails_as_documented():
    pytest.importorskip("q_galore_torch")
    from q_galore_torch import QGaLoreAdamW8bit

    p = nn.Parameter(torch.randn(8, 8))
    opt = QGaLoreAdamW8bit([p], lr=1e-3)
    p.grad = torch.randn(8, 8)
    with pytest.raises(KeyError, match="percentile_clipping"):
        opt.step()


def test_plain_parameters_step_as_torch_adamw():
    cls = _peer()
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(16, 12))
    b = nn.Parameter(a.detach().clone())
    ours = cls([a], lr=1e-2, weight_decay=0.1)  # 192 entries < min_8bit_size: 32-bit state
    ref = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(16, 12)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_projected_parameters_train_with_8bit_moments():
    cls = _peer()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 8))
    low = [model[0].weight]  # [256, 128], rank 32: projected gradient [256, 32] >= 4096 entries
    rest = [p for p in model.parameters() if p is not low[0]]
    opt = cls([dict(params=rest), dict(params=low, rank=32, update_proj_gap=3, scale=0.25, proj_type="std",
                                       quant=True, quant_n_bit=4, quant_group_size=256, cos_threshold=0.4,
                                       gamma_proj=2, queue_size=5)], lr=1e-2)
    x, y = torch.randn(32, 128), torch.randn(32, 8)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    state = opt.state[low[0]]
    assert state["state1"].dtype == torch.uint8 and state["state1"].shape == (256, 32)
    assert state["step"] == 12
