"""QVGen RankDecay: Φ from the quantisation residual, thin halving (no m×n SVD), cosine
fade, removal below rank 2, STE gradients, conversion to real W4A4, files, bad input."""
import math

import pytest
import torch
from torch import nn

from svdkernels.quant import dequantize_act, dequantize_weight, quantize_act, quantize_weight
from svdkernels.testing.errors import assert_raises_naming
from svdkernels.testing.files import assert_rejected_file, rewrite_safetensors
from svdkernels.train.rank_decay import QVGenLinear, RankDecay, fake_quant_act, fake_quant_weight, thin_halve

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))


def test_init_branch_is_svd_of_quantisation_residual():
    model = mlp()
    W = model[0].weight.detach().clone()
    rd = RankDecay(model, start_rank=8, every=2)
    layer = model[0]
    assert isinstance(layer, QVGenLinear) and layer.rank == 8
    resid = W - dequantize_weight(*quantize_weight(W))
    U, S, Vh = torch.linalg.svd(resid)
    torch.testing.assert_close(layer.L @ layer.R, (U[:, :8] * S[:8]) @ Vh[:8], atol=1e-6, rtol=0)
    # The branch makes the layer closer to the float layer than Q(x)Q(W) alone.
    x = torch.randn(16, 64)
    y = x @ W.T + model[0].bias
    yq = fake_quant_act(x) @ fake_quant_weight(layer.weight).T + layer.bias
    assert (layer(x) - y).norm() < (yq - y).norm()
    assert rd.total_steps == 2 * 4  # 8 -> 4 -> 2 -> removed, plus the last fade


def test_fake_quant_matches_formats_with_straight_through_gradient():
    x = torch.randn(3, 5, 64, requires_grad=True)
    out = fake_quant_act(x)
    torch.testing.assert_close(out, dequantize_act(*quantize_act(x.detach())))
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    W = torch.randn(8, 128, requires_grad=True)
    torch.testing.assert_close(fake_quant_weight(W), dequantize_weight(*quantize_weight(W.detach())))


def test_thin_halve_is_exact_and_uses_only_rxr_svd(monkeypatch):
    g = torch.Generator().manual_seed(0)
    L = torch.randn(2, 96, 8, dtype=torch.float64, generator=g)
    R = torch.randn(2, 8, 64, dtype=torch.float64, generator=g)
    Lk, Rk, Lr, Rr = thin_halve(L, R, 4)
    torch.testing.assert_close(Lk @ Rk + Lr @ Rr, L @ R)
    U, S, Vh = torch.linalg.svd(L @ R)
    torch.testing.assert_close(Lk @ Rk, (U[..., :4] * S[..., None, :4]) @ Vh[..., :4, :])
    # The whole schedule's halvings: every SVD is r×r.
    model = mlp()
    rd = RankDecay(model, start_rank=8, every=2)
    shapes = []
    svd = torch.linalg.svd

    def recording(A, *args, **kwargs):
        shapes.append(tuple(A.shape[-2:]))
        return svd(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", recording)
    for _ in range(rd.total_steps):
        rd.step()
    # One batched call per shape group (two here: 128×64 and 64×128) and halving.
    assert shapes == [(8, 8), (8, 8), (4, 4), (4, 4), (2, 2), (2, 2)], shapes
    assert rd.finished
    # Same output width, different input widths: two groups.
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(128, 64))
    rd = RankDecay(model, start_rank=4, every=1)
    shapes.clear()
    rd.step()
    assert sorted(shapes) == [(4, 4), (4, 4)] and model[2].rank == 2


def test_schedule_halves_fades_with_cosine_and_removes_below_rank_2():
    model = mlp()
    x = torch.randn(4, 64)
    rd = RankDecay(model, start_rank=4, every=4)
    layer = model[0]
    before = layer(x).detach()
    for _ in range(4):
        rd.step()
    # At the halving the function is unchanged: kept half + fading half (weight 1) = Φ.
    assert layer.rank == 2 and layer.fade_L.shape[1] == 2 and float(layer.fade_weight) == 1.0
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=0)
    weights = []
    for _ in range(4):
        rd.step()
        weights.append(float(layer.fade_weight))
    want = [0.5 * (1 + math.cos(math.pi * s / 4)) for s in (1, 2, 3)]
    assert weights[:3] == pytest.approx(want)
    # Step 8: the fade is over and the next halving (2 -> 1 < 2) fades all of Φ.
    assert layer.rank == 0 and layer.fade_L.shape[1] == 2 and not rd.finished
    for _ in range(4):
        rd.step()
    assert rd.finished and rd.steps == rd.total_steps == 12
    assert layer.L.numel() == 0 and layer.fade_L.numel() == 0


def test_training_with_optimizer_across_resizes_and_conversion_to_real_w4a4():
    model = mlp()
    X = torch.randn(32, 64)
    Y = model(X).detach()
    rd = RankDecay(model, start_rank=4, every=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(rd.total_steps):
        opt.zero_grad()
        ((model(X) - Y) ** 2).mean().backward()
        opt.step()
        rd.step(opt)
    assert rd.finished
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model[0].L) in ids and id(model[0].R) in ids  # the optimiser holds the current factors
    fq = model(X).detach()
    rd.to_quantized()
    from svdkernels.quant import LowRankQuantLinear

    assert isinstance(model[0], LowRankQuantLinear) and model[0].rank == 0
    torch.testing.assert_close(model(X), fq, atol=1e-4, rtol=1e-4)


def test_save_load_round_trip_with_changed_ranks(tmp_path):
    model = mlp()
    rd = RankDecay(model, start_rank=8, every=2)
    for _ in range(3):
        rd.step()
    rd.save(tmp_path / "rd.safetensors")
    other = mlp(seed=5)
    rd2 = RankDecay(other, start_rank=8, every=2)
    rd2.load(tmp_path / "rd.safetensors")
    assert (rd2.steps, rd2.rank) == (3, 4)
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    x = torch.randn(3, 64)
    assert torch.equal(other(x), model(x))
    rd.step()
    rd2.step()
    assert torch.equal(other(x), model(x))
    bad = rewrite_safetensors(tmp_path / "rd.safetensors", tmp_path / "bad.safetensors",
                              meta=lambda m: m.update(format="other"))
    fresh = RankDecay(mlp(), start_rank=8, every=2)
    assert_rejected_file(lambda _m, p: fresh.load(p), fresh.model, bad, ["svdkernels.rank_decay"])
    missing = rewrite_safetensors(tmp_path / "rd.safetensors", tmp_path / "missing.safetensors",
                                  tensors=lambda t: t.pop("0.weight"))
    assert_rejected_file(lambda _m, p: fresh.load(p), fresh.model, missing, ["0.weight"])
    wrong = rewrite_safetensors(tmp_path / "rd.safetensors", tmp_path / "wrong.safetensors",
                                tensors=lambda t: t.update({"0.fade_R": t["0.fade_R"][:, :32].contiguous()}))
    assert_rejected_file(lambda _m, p: fresh.load(p), fresh.model, wrong, ["0.fade_L"])
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    assert_rejected_file(lambda _m, p: fresh.load(p), fresh.model, tmp_path / "junk.safetensors")


def test_bad_input():
    assert_raises_naming(lambda: RankDecay(mlp(), start_rank=0), ValueError, ["start_rank", ">= 1", "0"])
    assert_raises_naming(lambda: RankDecay(mlp(), start_rank=65), ValueError, ["start_rank", "64", "65"])
    assert_raises_naming(lambda: RankDecay(mlp(), every=2.5), TypeError, ["every", "float"])
    odd = nn.Sequential(nn.Linear(48, 64))
    assert_raises_naming(lambda: RankDecay(odd, start_rank=4), ValueError, ["targets", "64", "48"])
    assert_raises_naming(lambda: RankDecay(nn.Linear(64, 64)), TypeError, ["model", "nn.Linear"])
    rd = RankDecay(mlp(), start_rank=4, every=10)
    assert_raises_naming(rd.to_quantized, ValueError, ["to_quantized", "Φ-free", "rank 4"])
    assert_raises_naming(lambda: rd.model[0](torch.randn(2, 32)), ValueError, ["x", "64", "(2, 32)"])
    rd.remove_branches()
    rd.to_quantized()
