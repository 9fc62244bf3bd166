"""Issue 12, quant: load_quantized checks its schema before changing the model; the
layer and quantize_model reject non-finite values and blame the right argument."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from svdkernels.errors import FormatError
from svdkernels.quant import LowRankQuantLinear, load_quantized, quantize_model, quantize_model_rtn, save_quantized
from svdkernels.testing.errors import assert_raises_naming
from svdkernels.testing.files import assert_rejected_file, rewrite_safetensors


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.gelu(self.up(x)))


def base() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def calib() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 64, generator=g) for _ in range(2)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``up`` signed W4A4, ``down`` unsigned W4A4 (after the GELU), with the config."""
    model = quantize_model(base(), calib(), rank=16, alphas=[0.5], refine_iters=0)
    assert model.down.unsigned and not model.up.unsigned
    path = tmp_path_factory.mktemp("schema") / "q.safetensors"
    save_quantized(model, path)
    return model, path


def _json_edit(key, fn):
    def edit(m):
        d = json.loads(m[key])
        fn(d)
        m[key] = json.dumps(d)
    return edit


LAYERS, CONFIG = "svdkernels.layers", "svdkernels.quant_config"
CORRUPTIONS = {
    "flipped-unsigned": (dict(meta=_json_edit(LAYERS, lambda d: d["down"].update(unsigned=False))),
                         ["'down'", "unsigned"]),
    "flipped-unsigned-up": (dict(meta=_json_edit(LAYERS, lambda d: d["up"].update(unsigned=True))),
                            ["'up'", "unsigned"]),
    "empty-layer-table": (dict(meta=lambda m: m.update({LAYERS: "{}"})), ["svdkernels.layers", "non-empty"]),
    "unknown-config-key": (dict(meta=_json_edit(CONFIG, lambda d: d.update(colour="red"))), ["quant_config",
                                                                                              "colour"]),
    "unknown-metadata-key": (dict(meta=lambda m: m.update(extra="1")), ["extra"]),
    "nan-scales": (dict(tensors=lambda t: t["up.scales"].view(-1)[3].fill_(math.nan)), ["up.scales", "finite"]),
    "inf-L_up": (dict(tensors=lambda t: t["down.L_up"].view(-1)[0].fill_(math.inf)), ["down.L_up", "finite"]),
    "zero-smooth": (dict(tensors=lambda t: t["up.smooth"].view(-1)[0].fill_(0.0)), ["up.smooth", "positive"]),
    "negative-smooth": (dict(tensors=lambda t: t["up.smooth"].mul_(-1)), ["up.smooth", "positive"]),
    "extra-tensor": (dict(tensors=lambda t: t.update({"up.extra": torch.zeros(2)})), ["up.extra", "unexpected"]),
    "missing-bias": (dict(tensors=lambda t: t.pop("down.bias")), ["down.bias", "missing"]),
    "rank-mismatch": (dict(meta=_json_edit(LAYERS, lambda d: d["up"].update(rank=32))), ["up.L_down", "[32, 64]"]),
    "rank-not-multiple": (dict(meta=_json_edit(LAYERS, lambda d: d["up"].update(rank=8))), ["'up'", "rank", "8"]),
    "acts-unknown": (dict(meta=_json_edit(LAYERS, lambda d: d["up"].update(acts="int8"))), ["acts", "int8"]),
    "dtype-unknown": (dict(meta=_json_edit(LAYERS, lambda d: d["up"].update(dtype="float64"))), ["dtype",
                                                                                                 "float64"]),
    "features-as-str": (dict(meta=_json_edit(LAYERS, lambda d: d["up"].update(in_features="64"))),
                        ["in_features"]),
    "missing-layer-key": (dict(meta=_json_edit(LAYERS, lambda d: d["up"].pop("bias"))), ["'up'", "keys"]),
    "bad-json": (dict(meta=lambda m: m.update({LAYERS: "{oops"})), ["svdkernels.layers", "JSON"]),
    "bad-config-json": (dict(meta=lambda m: m.update({CONFIG: "[1,"})), ["quant_config", "JSON"]),
    "config-alpha-nan": (dict(meta=_json_edit(CONFIG, lambda d: d["layers"]["up"].update(alpha=math.nan))),
                         ["'up'", "alpha"]),
    "missing-version": (dict(meta=lambda m: m.pop("svdkernels.format_version")), ["version", "None"]),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_load_quantized_rejects_corrupted_files_and_changes_nothing(saved, tmp_path, case):
    _, path = saved
    edits, words = CORRUPTIONS[case]
    bad = rewrite_safetensors(path, tmp_path / "bad.safetensors", **edits)
    model = base()
    assert_rejected_file(load_quantized, model, bad, words)
    assert type(model.up) is nn.Linear and type(model.down) is nn.Linear
    assert not hasattr(model, "svdkernels_quant_config")


@pytest.mark.parametrize("content", [b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{}", b"junk" * 10])
def test_load_quantized_wraps_unreadable_files(tmp_path, content):
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(content)
    with pytest.raises(FormatError, match="junk.safetensors"):
        load_quantized(base(), bad)


def test_truncated_file(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    for cut in (8, len(data) // 3, len(data) - 1):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(FormatError, match=f"cut{cut}"):
            load_quantized(base(), bad)


def test_valid_file_still_loads_bit_identical(saved):
    model, path = saved
    back = load_quantized(base(), path)
    x = torch.randn(4, 64)
    assert torch.equal(back(x), model(x))


def test_bare_linear_is_quantised_and_returned(tmp_path):
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    x = torch.randn(16, 64)
    q = quantize_model(layer, [x], rank=16, alphas=[0.5], refine_iters=0)
    assert isinstance(q, LowRankQuantLinear) and hasattr(q, "svdkernels_quant_config")
    # 4-bit weights and activations: close to the float layer, not equal.
    err = (q(x) - layer(x)).norm() / layer(x).norm()
    assert err < 0.2, err
    save_quantized(q, tmp_path / "bare.safetensors")
    back = load_quantized(nn.Linear(64, 32), tmp_path / "bare.safetensors")
    assert isinstance(back, LowRankQuantLinear) and torch.equal(back(x), q(x))
    assert isinstance(quantize_model_rtn(nn.Linear(64, 32)), LowRankQuantLinear)


def test_nan_calibration_blames_the_calibration():
    x = torch.randn(8, 64)
    x[2, 3] = math.nan
    assert_raises_naming(lambda: quantize_model(base(), [x], rank=16), ValueError, ["calib_batches", "'up'",
                                                                                     "NaN"])
    model = base()
    with torch.no_grad():
        model.up.weight[0, 0] = math.nan
    assert_raises_naming(lambda: quantize_model(model, [torch.randn(8, 64)], rank=16), ValueError,
                         ["model", "'up'", "non-finite"])


def test_layer_values_are_checked():
    W = torch.randn(32, 64)
    assert_raises_naming(lambda: LowRankQuantLinear.from_float(W, smooth=torch.zeros(64), rank=16), ValueError,
                         ["smooth", "positive"])
    assert_raises_naming(lambda: LowRankQuantLinear.from_float(W, smooth=-torch.ones(64), rank=16), ValueError,
                         ["smooth", "positive", "-1"])
    assert_raises_naming(lambda: LowRankQuantLinear.from_float(W, smooth=torch.full((64,), math.nan), rank=16),
                         ValueError, ["smooth", "finite"])
    assert_raises_naming(lambda: LowRankQuantLinear.from_float(W, rank=16, refine=1), TypeError,
                         ["refine", "'refine_iters'"])
    assert_raises_naming(lambda: LowRankQuantLinear.from_float(W, rank=16, seed=2**70), ValueError, ["seed"])
    layer = LowRankQuantLinear.from_float(W, rank=16)
    scales = layer.scales.clone()
    scales[0, 0] = math.nan
    assert_raises_naming(lambda: LowRankQuantLinear(layer.qweight, scales, layer.L_down, layer.L_up, layer.smooth),
                         ValueError, ["scales", "finite"])
    assert_raises_naming(lambda: layer.merge_lora(torch.randn(4, 64), torch.randn(32, 4), math.nan), ValueError,
                         ["scale", "nan"])
    assert_raises_naming(lambda: quantize_model(base(), calib(), rnak=16), TypeError, ["rnak", "'rank'"])
    assert_raises_naming(lambda: quantize_model(base(), calib(), alphas=[True]), ValueError, ["alphas"])
