"""quantize_model / quantize_model_rtn (svdkernels/quant/model.py) and the
calibration hooks (svdkernels/calibration.py) on a toy MLP with a GELU."""

import pytest
import torch
from torch import nn

from svdkernels.testing.metrics import sqnr
from svdkernels.quant import (
    DEFAULT_ALPHAS,
    LowRankQuantLinear,
    QuantConfig,
    layer_sqnr,
    quantize_model,
    quantize_model_rtn,
)
from svdkernels.calibration import collect_input_stats
from svdkernels.quant.linear import decompose
from svdkernels.quant.model import candidate_output
from svdkernels.testing.errors import assert_raises_naming

D, H = 128, 256


class MLP(nn.Module):
    """fc1 -> GELU -> fc2 (quantisable), a 10-way head (too narrow for r = 32), a
    layer with in_features 100 (not a multiple of 64) and one never called."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D, H)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(H, D)
        self.head = nn.Linear(D, 10)
        self.odd = nn.Linear(100, 64)
        self.unused = nn.Linear(D, D)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(self.drop(self.act(self.fc1(x))))
        return self.head(h) + self.odd(h[..., :100]).sum(-1, keepdim=True)


def make_model(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().eval()


def batches(n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(2, 16, D, generator=g)
        x[..., :3] *= 20  # outlier channels: what smoothing is for
        out.append(x)
    return out


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.fixture(scope="module")
def quantized() -> tuple[MLP, MLP]:
    base = make_model()
    model = quantize_model(make_model(), batches(), rank=32, acts="int4")
    return base, model


def test_layers_replaced_and_skipped_with_reasons(quantized):
    base, model = quantized
    assert isinstance(model.fc1, LowRankQuantLinear) and isinstance(model.fc2, LowRankQuantLinear)
    for name in ("head", "odd", "unused"):
        assert isinstance(getattr(model, name), nn.Linear)
    cfg = model.svdkernels_quant_config
    assert isinstance(cfg, QuantConfig) and set(cfg.layers) == {"fc1", "fc2"}
    assert "at most" in cfg.skipped["head"] and "multiple of 64" in cfg.skipped["odd"]
    assert "never called" in cfg.skipped["unused"]
    assert no_hooks(model)
    x = batches(1, seed=9)[0]
    with torch.no_grad():
        assert sqnr(base(x), model(x)) > 15


def test_alpha_from_the_grid_and_unsigned_after_gelu(quantized):
    _, model = quantized
    cfg = model.svdkernels_quant_config
    for name in ("fc1", "fc2"):
        assert cfg.layers[name].alpha in DEFAULT_ALPHAS
        assert cfg.layers[name].rank == 32 and cfg.layers[name].calib_sqnr_db > 15
    assert not cfg.layers["fc1"].unsigned and not model.fc1.unsigned  # inputs: randn with outliers
    assert cfg.layers["fc2"].unsigned and model.fc2.unsigned  # inputs: GELU outputs >= -0.17
    # forced off, and never for 16-bit activations
    forced = quantize_model(make_model(), batches(), targets=["fc2"], unsigned=False, alphas=[0.5], refine_iters=0)
    assert not forced.fc2.unsigned
    w4a16 = quantize_model(make_model(), batches(), targets=["fc2"], acts=None, alphas=[0.5], refine_iters=0)
    assert not w4a16.fc2.unsigned and w4a16.fc2.acts is None


def test_grid_search_picks_the_lowest_calibration_error():
    """The grid's winner has the smallest calibration MSE of the single-α runs
    (same rows; rank 0, so no randomized SVD whose sketch depends on the
    candidate's place in the batch: each run builds exactly the same candidate)."""
    grid = [0.0, 0.5, 1.0]
    kw = dict(targets=["fc1"], rank=0, refine_iters=0)
    best = quantize_model(make_model(), batches(), alphas=grid, **kw).svdkernels_quant_config.layers["fc1"]
    singles = {a: quantize_model(make_model(), batches(), alphas=[a], **kw).svdkernels_quant_config.layers["fc1"]
               for a in grid}
    assert best.alpha in grid
    assert best.calib_mse == min(s.calib_mse for s in singles.values()) == singles[best.alpha].calib_mse
    assert singles[0.5].alpha == 0.5
    # smoothing pays off against the outlier channels
    plain = quantize_model(make_model(), batches(), alphas=None, **kw)
    assert plain.svdkernels_quant_config.layers["fc1"].alpha is None
    assert torch.equal(plain.fc1.smooth, torch.ones(D))
    assert best.calib_mse < plain.svdkernels_quant_config.layers["fc1"].calib_mse


def test_refinement_does_not_increase_the_weight_error():
    kw = dict(targets=["fc1", "fc2"], alphas=[0.5])
    e0 = quantize_model(make_model(), batches(), refine_iters=0, **kw).svdkernels_quant_config
    e3 = quantize_model(make_model(), batches(), refine_iters=3, **kw).svdkernels_quant_config
    for name in ("fc1", "fc2"):
        assert e3.layers[name].weight_rel_error <= e0.layers[name].weight_rel_error
        assert e3.layers[name].calib_mse <= e0.layers[name].calib_mse


def test_targets():
    only = quantize_model(make_model(), batches(), targets=["fc1"], alphas=[0.5], refine_iters=0)
    assert isinstance(only.fc1, LowRankQuantLinear) and isinstance(only.fc2, nn.Linear)
    regex = quantize_model(make_model(), batches(), targets=r"fc\d", alphas=[0.5], refine_iters=0)
    assert isinstance(regex.fc1, LowRankQuantLinear) and isinstance(regex.fc2, LowRankQuantLinear)
    # a second call adds to the record of the first
    both = quantize_model(only, batches(), targets=["fc2"], alphas=[0.5], refine_iters=0)
    assert set(both.svdkernels_quant_config.layers) == {"fc1", "fc2"}


def test_calibration_stats_and_eval_mode():
    model = make_model().train()
    layers = {"fc1": model.fc1, "fc2": model.fc2}
    stats = collect_input_stats(model, layers, batches(), max_rows=40)
    assert model.training and model.drop.training  # flags restored
    assert no_hooks(model)
    xs = torch.cat([b.reshape(-1, D) for b in batches()])
    assert stats["fc1"].n_rows == 128 and stats["fc1"].rows.shape == (40, D)
    torch.testing.assert_close(stats["fc1"].absmax, xs.abs().amax(0))
    torch.testing.assert_close(stats["fc1"].rms(), xs.square().mean(0).sqrt())
    torch.testing.assert_close(stats["fc1"].rms(0.5), (xs + 0.5).square().mean(0).sqrt())
    # the sample is made of real input rows
    assert all((row == xs).all(1).any() for row in stats["fc1"].rows)
    # eval mode during calibration: dropout off, so fc2 saw GELU outputs >= -0.17 exactly
    assert stats["fc2"].min >= -0.17
    with torch.no_grad():
        assert stats["fc2"].min == float(nn.functional.gelu(model.fc1(xs)).min())


def test_hooks_removed_when_a_batch_fails():
    model = make_model()
    bad = batches(1) + [torch.randn(3, 7)]  # wrong width: fc1 raises
    with pytest.raises(RuntimeError):
        quantize_model(model, bad)
    assert no_hooks(model)
    assert all(isinstance(getattr(model, n), nn.Linear) for n in ("fc1", "fc2"))  # nothing replaced


def test_layer_sqnr():
    base, model = make_model(), quantize_model(make_model(), batches(), alphas=[0.5], refine_iters=0)
    db = layer_sqnr(base, model, batches(2, seed=5))
    assert set(db) == {"fc1", "fc2"} and all(15 < v < 60 for v in db.values())
    assert no_hooks(base)


def test_rtn_baseline():
    base = make_model()
    model = quantize_model_rtn(make_model(), acts="int4")
    assert isinstance(model.fc1, LowRankQuantLinear) and model.fc1.rank == 0
    assert torch.equal(model.fc1.smooth, torch.ones(D)) and not model.fc2.unsigned
    # rank 0 fits the 10-way head; in_features 100 still cannot be grouped by 64
    assert set(model.svdkernels_quant_config.layers) == {"fc1", "fc2", "head", "unused"}
    assert set(model.svdkernels_quant_config.skipped) == {"odd"}
    svd = quantize_model(make_model(), batches(), rank=32)
    test = batches(2, seed=5)
    assert sum(layer_sqnr(base, svd, test).values()) > sum(layer_sqnr(base, model, test).values())


def test_errors():
    m = make_model
    b = batches
    assert_raises_naming(lambda: quantize_model(m(), b(), weights="fp4"), ValueError, ["weights", "'int4'", "fp4"])
    assert_raises_naming(lambda: quantize_model(m(), b(), acts="int8"), ValueError, ["acts", "int8"])
    assert_raises_naming(lambda: quantize_model_rtn(m(), acts="fp8"), ValueError, ["acts", "fp8"])
    assert_raises_naming(lambda: quantize_model(m(), b(), rank=20), ValueError, ["rank", "multiple of 16", "20"])
    assert_raises_naming(lambda: quantize_model(m(), b(), rank=32, targets=["head"]), ValueError,
                         ["rank", "'head'", "at most", "10"])
    assert_raises_naming(lambda: quantize_model(m(), b(), targets=["odd"]), ValueError,
                         ["targets", "'odd'", "in_features = 100", "multiple of 64"])
    assert_raises_naming(lambda: quantize_model(m(), b(), targets=["fc3"]), ValueError,
                         ["targets", "'fc3'", "matching none"])
    assert_raises_naming(lambda: quantize_model(m(), b(), targets="conv.*"), ValueError, ["targets", "conv.*"])
    assert_raises_naming(lambda: quantize_model(m(), b(), targets=3), TypeError, ["targets", "3"])
    assert_raises_naming(lambda: quantize_model(m(), b(), targets=["unused"]), ValueError, ["'unused'", "never called"])
    assert_raises_naming(lambda: quantize_model(m(), []), ValueError, ["calib_batches", "empty"])
    assert_raises_naming(lambda: quantize_model(m(), iter([])), ValueError, ["calib_batches", "empty"])
    assert_raises_naming(lambda: quantize_model(m(), None), TypeError, ["calib_batches", "iterable", "NoneType"])
    assert_raises_naming(lambda: quantize_model(m(), b()[0]), TypeError, ["calib_batches", "iterable", "Tensor"])
    assert_raises_naming(lambda: quantize_model(m(), b(), alphas=[1.5]), ValueError, ["alphas", "[0, 1]", "1.5"])
    assert_raises_naming(lambda: quantize_model(m(), b(), act_stat="mean"), ValueError, ["act_stat", "mean"])
    assert_raises_naming(lambda: quantize_model(m(), b(), dtype=torch.int8), TypeError, ["dtype", "int8"])
    assert_raises_naming(lambda: quantize_model("model", b()), TypeError, ["model", "Module", "str"])
    assert_raises_naming(lambda: quantize_model(nn.Sequential(nn.Linear(100, 8)), b()), ValueError,
                         ["model", "at least one", "multiple of 64"])
    broken = m()
    with torch.no_grad():
        broken.fc2.weight[0, 0] = float("inf")
    assert_raises_naming(lambda: quantize_model(broken, b()), ValueError, ["'fc2'", "non-finite"])


@pytest.mark.parametrize("acts, unsigned, dtype", [(None, False, torch.float32), ("int4", False, torch.float32),
                                                   ("int4", True, torch.float32), ("int4", True, torch.bfloat16)])
def test_candidate_output_is_the_layer_output(acts, unsigned, dtype):
    """The search ranks candidates with the layer's math on dequantised operands;
    it agrees with the layer (the ops) up to float32 summation order."""
    g = torch.Generator().manual_seed(3)
    W, b = torch.randn(64, 128, generator=g), torch.randn(64, generator=g)
    lam = torch.rand(1, 128, generator=g) + 0.5
    d = decompose(W, lam, rank=16, refine_iters=0, smoothed_residual=acts is not None, dtype=dtype)
    layer = LowRankQuantLinear.from_parts(d.qweight[0], d.scales[0], d.L_down[0], d.L_up[0], lam[0], b,
                                          acts=acts, unsigned=unsigned)
    x = torch.randn(20, 128, generator=g)
    x = nn.functional.gelu(x) if unsigned else x
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=0.1)  # one bf16 rounding
    torch.testing.assert_close(candidate_output(layer, d.residual[0], x).float(), layer(x), **tol)
