"""Issue 12, adapters: nothing silent. A bare layer is adapted, a typo is an error
naming the nearest keyword, non-adapter parameters are frozen, hyper-parameters are
finite, and the adapter files are checked against a schema before the model changes."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from svdkernels.adapters import AdaLoRABudget, KronLinear, SVDLinear, adapt, load_adapter, save_adapter
from svdkernels.errors import FormatError
from svdkernels.testing.adapters import calib_batches, inputs, perturb, toy_model
from svdkernels.testing.errors import assert_raises_naming
from svdkernels.testing.files import assert_rejected_file, rewrite_safetensors


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# -- silent wrong semantics ------------------------------------------------------------


@pytest.mark.parametrize("method", ["pissa", "lora", "soka"])
def test_bare_linear_is_adapted_and_returned(method):
    torch.manual_seed(0)
    layer = nn.Linear(64, 64)
    x = torch.randn(5, 64)
    y0 = layer(x)
    out = adapt(layer, method, rank=4)
    assert isinstance(out, KronLinear if method == "soka" else SVDLinear)
    assert out is not layer
    torch.testing.assert_close(out(x), y0, rtol=1e-4, atol=1e-4)  # outputs unchanged at init (fp32 rsvd)
    # The adapter is used: moving its trainable factors moves the output.
    perturb(out)
    assert not torch.allclose(out(x), y0, atol=1e-3)


def test_bare_linear_round_trips_through_a_file(tmp_path):
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    original = copy.deepcopy(layer)
    out = adapt(layer, "pissa", rank=4)
    perturb(out)
    save_adapter(out, tmp_path / "a.safetensors")
    back = load_adapter(original, tmp_path / "a.safetensors")
    assert isinstance(back, SVDLinear)
    x = torch.randn(3, 64)
    assert torch.equal(back(x), out(x))


def test_typo_keyword_is_an_error_naming_the_nearest():
    assert_raises_naming(lambda: adapt(toy_model(), "sorsa", gama=1.0), TypeError, ["gama", "'gamma'"])
    # gamma belongs to sorsa/kasa, not to pissa: the hint says whose it is.
    assert_raises_naming(lambda: adapt(toy_model(), "pissa", gama=1.0), TypeError,
                         ["gama", "'gamma'", "method"])
    assert_raises_naming(lambda: adapt(toy_model(), "pissa", rnak=4), TypeError, ["rnak", "'rank'"])
    assert_raises_naming(lambda: adapt(toy_model(), "soka", enrgy=0.5), TypeError, ["enrgy", "'energy'"])
    assert_raises_naming(lambda: KronLinear(nn.Linear(16, 16), scael=2.0), TypeError, ["scael", "'scale'"])


@pytest.mark.parametrize("kw,exc,words", [
    (dict(method="sorsa", gamma=math.nan), ValueError, ["gamma", "finite", "nan"]),
    (dict(method="kasa", beta=-1.0), ValueError, ["beta", ">= 0", "-1"]),
    (dict(method="salt", reg_weight=math.inf), ValueError, ["reg_weight", "inf"]),
    (dict(method="pissa", alpha=math.nan), ValueError, ["alpha", "nan"]),
    (dict(method="pissa", oversample=-1), ValueError, ["oversample", "-1"]),
    (dict(method="pissa", n_iter=1.5), TypeError, ["n_iter", "int", "1.5"]),
    (dict(method="nlora", train_core_only="yes"), TypeError, ["train_core_only", "bool"]),
    (dict(method="eva", rho=0.5), ValueError, ["rho", ">= 1", "0.5"]),
    (dict(method="pissa", seed=2**70), ValueError, ["seed", "2**63"]),
    (dict(method="pissa", seed=1.0), TypeError, ["seed", "int", "float"]),
    (dict(method="soka", scale=math.nan), ValueError, ["scale", "nan"]),
    (dict(method="soka", energy=1.5), ValueError, ["energy", "1.5"]),
])
def test_non_finite_or_out_of_range_hyperparameters(kw, exc, words):
    model = toy_model()
    before = copy.deepcopy(model.state_dict())
    calib = calib_batches() if kw["method"] == "eva" else None
    assert_raises_naming(lambda: adapt(model, rank=4, calib_batches=calib, **kw), exc, words)
    for k, v in model.state_dict().items():  # nothing changed
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("method", ["corda", "eva"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_calibration_blames_the_batches(method, value):
    batches = calib_batches()
    batches[1][3, 5] = value
    model = toy_model()
    before = copy.deepcopy(model.state_dict())
    assert_raises_naming(lambda: adapt(model, method, rank=4, calib_batches=batches), ValueError,
                         ["calib_batches", "'0'", "NaN or inf"])
    assert all(type(m) is not SVDLinear for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_kronlinear_nan_scale_leaves_the_weight_alone():
    base = nn.Linear(16, 16)
    W = base.weight.detach().clone()
    assert_raises_naming(lambda: KronLinear(base, scale=math.nan), ValueError, ["scale", "nan"])
    assert torch.equal(base.weight, W) and base.weight.requires_grad
    assert_raises_naming(lambda: KronLinear.from_factors(base, torch.randn(4, 4), torch.randn(4, 4), scale=math.inf),
                         ValueError, ["scale", "inf"])
    with torch.no_grad():
        base.weight[0, 0] = math.nan
    assert_raises_naming(lambda: KronLinear(base), ValueError, ["base", "finite"])


def test_soka_failure_on_a_later_layer_leaves_the_model_unchanged():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 32))
    before = copy.deepcopy(model.state_dict())
    # (4, 4) x (4, 4) fits the first layer only.
    with pytest.raises(ValueError, match="a_shape"):
        adapt(model, "soka", rank=1, a_shape=(4, 4), b_shape=(4, 4))
    assert all(type(m) is nn.Linear for m in model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_non_adapter_parameters_are_frozen_by_default():
    model = nn.Sequential(nn.Embedding(10, 64), nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 8))
    adapt(model, "lora", rank=4, targets=["1"])
    assert _trainable(model) == {"1.lora_A", "1.lora_B"}


def test_modules_to_save_stay_trainable():
    model = nn.Sequential(nn.Embedding(10, 64), nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 8))
    model[3].requires_grad_(False)  # named, so made trainable
    adapt(model, "lora", rank=4, targets=["1"], modules_to_save=["3", "2"])
    assert _trainable(model) == {"1.lora_A", "1.lora_B", "2.weight", "2.bias", "3.weight", "3.bias"}
    assert_raises_naming(lambda: adapt(toy_model(), "lora", rank=4, targets=["0"], modules_to_save=["head"]),
                         ValueError, ["modules_to_save", "head"])
    assert_raises_naming(lambda: adapt(toy_model(), "lora", rank=4, targets=["0"], modules_to_save=["0"]),
                         ValueError, ["modules_to_save", "adapted"])
    assert_raises_naming(lambda: adapt(toy_model(), "lora", rank=4, modules_to_save=3), TypeError,
                         ["modules_to_save", "3"])


def test_a_second_adapt_keeps_the_first_adapters_trainable():
    model = adapt(toy_model(), "lora", rank=4, targets=["0"])
    adapt(model, "pissa", rank=4, targets=["2"])
    assert _trainable(model) == {"0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"}


def test_layer_constructors_validate():
    A, B = torch.randn(4, 16), torch.randn(8, 4)
    assert_raises_naming(lambda: SVDLinear.from_parts("pisa", weight=None, bias=None, A=A, B=B), ValueError,
                         ["method", "'pisa'"])
    assert_raises_naming(lambda: SVDLinear.from_parts("lora", weight=None, bias=None, A=A, B=B, scaling=math.nan),
                         ValueError, ["scaling", "nan"])
    assert_raises_naming(lambda: SVDLinear.from_parts("lora", weight=torch.randn(8, 15), bias=None, A=A, B=B),
                         ValueError, ["weight", "[8, 16]", "[8, 15]"])
    assert_raises_naming(lambda: SVDLinear.from_parts("lora", weight=None, bias=None, A=A, B=B, scalling=2.0),
                         TypeError, ["scalling", "'scaling'"])
    model = adapt(toy_model(), "adalora", rank=4)
    assert_raises_naming(lambda: AdaLoRABudget(model, target_rank=2, total_steps=10, beta1=math.nan),
                         ValueError, ["beta1", "nan"])
    assert_raises_naming(lambda: AdaLoRABudget(model, target_rank=2, total_step=10), TypeError,
                         ["total_step", "'total_steps'"])


# -- adapter files -----------------------------------------------------------------------


def _saved(tmp_path, method="pissa"):
    model = adapt(toy_model(), method, rank=4, calib_batches=calib_batches() if method == "eva" else None)
    perturb(model)
    path = tmp_path / "a.safetensors"
    save_adapter(model, path)
    return model, path


def _edit_layers(fn):
    def edit(m):
        layers = json.loads(m["layers"])
        fn(layers)
        m["layers"] = json.dumps(layers)
    return edit


CORRUPTIONS = {
    "extra-tensor": (dict(tensors=lambda t: t.update({"0.lora_Z": torch.zeros(3)})), ["lora_Z", "unexpected"]),
    "missing-tensor": (dict(tensors=lambda t: t.pop("0.removed_up")), ["removed_up", "missing"]),
    "wrong-shape": (dict(tensors=lambda t: t.update({"0.lora_A": torch.zeros(4, 63)})), ["0.lora_A", "[4, 64]"]),
    "wrong-dtype": (dict(tensors=lambda t: t.update({"0.lora_A": t["0.lora_A"].double()})), ["0.lora_A", "float64"]),
    "nan-tensor": (dict(tensors=lambda t: t["0.lora_B"].view(-1)[0].fill_(math.nan)), ["0.lora_B", "finite"]),
    "has-weight-false": (dict(meta=_edit_layers(lambda L: L["0"].update(has_weight=False))), ["has_weight"]),
    "unknown-method": (dict(meta=_edit_layers(lambda L: L["0"].update(method="pisa"))), ["method", "'pisa'"]),
    "nan-scaling": (dict(meta=_edit_layers(lambda L: L["0"].update(scaling=math.nan))), ["scaling", "nan"]),
    "missing-version": (dict(meta=lambda m: m.pop("version")), ["version", "None"]),
    "future-version": (dict(meta=lambda m: m.update(version="2")), ["version", "'2'"]),
    "bad-json": (dict(meta=lambda m: m.update(layers="{not json")), ["layers", "JSON"]),
    "missing-key": (dict(meta=_edit_layers(lambda L: L["0"].pop("config"))), ["layer '0'", "keys"]),
    "unknown-key": (dict(meta=_edit_layers(lambda L: L["0"].update(colour=1))), ["colour"]),
    "train-the-base": (dict(meta=_edit_layers(lambda L: L["0"].update(trainable=["weight"]))), ["trainable"]),
    "features-as-str": (dict(meta=_edit_layers(lambda L: L["0"].update(in_features="64"))), ["in_features"]),
    "empty-layers": (dict(meta=lambda m: m.update(layers="{}")), ["layers", "non-empty"]),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_load_adapter_rejects_corrupted_files_and_changes_nothing(tmp_path, case):
    _, path = _saved(tmp_path)
    edits, words = CORRUPTIONS[case]
    bad = rewrite_safetensors(path, tmp_path / "bad.safetensors", **edits)
    model = toy_model()
    assert_rejected_file(load_adapter, model, bad, words)
    assert all(type(m) is not SVDLinear for m in model.modules())


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, b"not a safetensors file at all", b"\xff" * 64])
def test_load_adapter_wraps_unreadable_files(tmp_path, content):
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(content)
    with pytest.raises(FormatError, match="safetensors"):
        load_adapter(toy_model(), bad)


def test_load_adapter_truncated_file(tmp_path):
    _, path = _saved(tmp_path)
    data = path.read_bytes()
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="trunc.safetensors"):
        load_adapter(toy_model(), bad)
    with pytest.raises(FileNotFoundError):
        load_adapter(toy_model(), tmp_path / "nope.safetensors")


def test_load_adapter_dtype_must_match_the_model(tmp_path):
    _, path = _saved(tmp_path)
    with pytest.raises(FormatError, match="bfloat16"):
        load_adapter(toy_model(torch.bfloat16), path)


@pytest.mark.parametrize("method", ["lora", "salt", "adalora", "clip_svd", "nlora"])
def test_valid_files_of_every_layout_load(tmp_path, method):
    model, path = _saved(tmp_path, method)
    back = load_adapter(toy_model(), path)
    x = inputs()
    assert torch.equal(back(x), model(x))
