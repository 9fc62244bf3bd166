"""LOST: LowRankSparseLinear (forward/backward without the dense weight), lost_init from
the SVD (top components, channels by residual energy), merge, safetensors, bad input."""
import pytest
import torch
from torch import nn

from svdkernels.testing.errors import assert_raises_naming
from svdkernels.train.lost import LowRankSparseLinear, lost_init, lowrank_rank_at_same_params

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32))


def test_full_rank_init_is_exact_and_channels_come_from_residual_energy():
    model = mlp()
    X = torch.randn(6, 32)
    Y = model(X).detach()
    W = model[0].weight.detach().clone()
    full = mlp()
    lost_init(full, 32, 0)
    torch.testing.assert_close(full(X), Y, atol=1e-5, rtol=0)
    new = lost_init(model, 4, 8)
    layer = new["0"]
    U, S, Vh = torch.linalg.svd(W)
    torch.testing.assert_close(layer.B @ layer.A, (U[:, :4] * S[:4]) @ Vh[:4], atol=1e-5, rtol=0)
    R = W - (U[:, :4] * S[:4]) @ Vh[:4]
    want = R.norm(dim=0).topk(8).indices.sort().values
    assert torch.equal(layer.channels, want)
    torch.testing.assert_close(layer.S, R[:, want], atol=1e-5, rtol=0)
    # B·A + S is a better weight than B·A alone (the channels carry the most residual energy).
    assert (W - layer.dense_weight()).norm() < (W - layer.B @ layer.A).norm()


def test_forward_backward_match_dense_and_never_form_w():
    layer = LowRankSparseLinear(24, 16, 3, 5, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (layer.B, layer.A, layer.S, layer.bias):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        layer.channels.copy_(torch.tensor([1, 4, 7, 20, 23]))
    x = torch.randn(2, 3, 24, generator=g, dtype=torch.float64, requires_grad=True)
    W = layer.dense_weight().detach().requires_grad_()
    ref = x @ W.T + layer.bias
    out = layer(x)
    torch.testing.assert_close(out, ref)
    # No [16, 24] (or [24, 16]) tensor is made in forward or backward.
    from torch.utils._python_dispatch import TorchDispatchMode

    shapes = []

    class Shapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            r = func(*args, **(kwargs or {}))
            for t in (r if isinstance(r, (tuple, list)) else [r]):
                if isinstance(t, torch.Tensor):
                    shapes.append(tuple(t.shape))
            return r

    with Shapes():
        y = layer(x)
        (y * y).sum().backward()
    assert shapes and (16, 24) not in shapes and (24, 16) not in shapes, shapes
    gx = x.grad.clone()
    x.grad = None
    (ref * ref).sum().backward()
    gW = W.grad
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(layer.S.grad, gW[:, layer.channels])
    torch.testing.assert_close(layer.B.grad, gW @ layer.A.detach().T)
    torch.testing.assert_close(layer.A.grad, layer.B.detach().T @ gW)


def test_merge_and_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    model = mlp()
    lost_init(model, 4, 6)
    X = torch.randn(5, 32)
    merged = model[0].merge()
    torch.testing.assert_close(merged(X), model[0](X), atol=1e-5, rtol=1e-5)
    save_file(model.state_dict(), str(tmp_path / "lost.safetensors"))
    fresh = mlp(seed=3)
    lost_init(fresh, 4, 6)
    fresh.load_state_dict(load_file(str(tmp_path / "lost.safetensors")))
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert torch.equal(fresh(X), model(X))
    bad = load_file(str(tmp_path / "lost.safetensors"))
    bad["0.channels"] = torch.tensor([0, 0, 1, 2, 3, 4])
    assert_raises_naming(lambda: fresh.load_state_dict(bad), ValueError, ["0.channels", "distinct"])


def test_same_parameter_count_rank():
    m, n, r, c = 48, 32, 4, 8
    lost = LowRankSparseLinear(n, m, r, c, bias=False)
    r2 = lowrank_rank_at_same_params(n, m, r, c)
    plain = LowRankSparseLinear(n, m, r2, 0, bias=False)
    p_lost = sum(p.numel() for p in lost.parameters())
    p_plain = sum(p.numel() for p in plain.parameters())
    assert p_plain <= p_lost < p_plain + (m + n)


def test_bad_input():
    assert_raises_naming(lambda: lost_init(mlp(), 33, 2), ValueError, ["rank", "32", "33"])
    assert_raises_naming(lambda: lost_init(mlp(), 0, 2), ValueError, ["rank", ">= 1", "0"])
    assert_raises_naming(lambda: lost_init(mlp(), 4, 40), ValueError, ["sparse_channels", "32", "40"])
    assert_raises_naming(lambda: lost_init(mlp(), 4.0, 2), TypeError, ["rank", "float"])
    assert_raises_naming(lambda: lost_init(nn.Linear(4, 4), 2, 1), TypeError, ["model", "nn.Linear"])
    assert_raises_naming(lambda: lost_init(mlp(), 2, 1, targets="zz"), ValueError, ["targets", "zz"])
    layer = LowRankSparseLinear(8, 8, 2, 2)
    assert_raises_naming(lambda: layer(torch.randn(3, 7)), ValueError, ["x", "8", "(3, 7)"])
