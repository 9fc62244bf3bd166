"""load_compressed checks the whole file before it changes the model (issue 12's file
discipline): every corruption is a FormatError naming the file, the model untouched."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from svdkernels import FormatError
from svdkernels.compress import LowRankInt4Linear, LowRankLinear, compress_model, load_compressed, save_compressed
from svdkernels.testing.files import assert_rejected_file


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    base = _model()
    model = compress_model(copy.deepcopy(base), [torch.randn(32, 16) for _ in range(2)], method="svd_llm",
                           keep=0.5, budget="uniform")
    path = tmp_path_factory.mktemp("c") / "model.safetensors"
    save_compressed(model, path)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    return base, model, path, meta, tensors


def _rewrite(tmp_path, meta, tensors):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


def _layers(meta):
    return json.loads(meta["svdkernels.layers"])


CORRUPTIONS = {
    "version": lambda m, t: ({**m, "svdkernels.format_version": "9"}, t),
    "format": lambda m, t: ({**m, "svdkernels.format": "other"}, t),
    "unknown-key": lambda m, t: ({**m, "extra": "1"}, t),
    "no-table": lambda m, t: ({k: v for k, v in m.items() if k != "svdkernels.layers"}, t),
    "bad-json": lambda m, t: ({**m, "svdkernels.layers": "{not json"}, t),
    "rank-type": lambda m, t: ({**m, "svdkernels.layers": json.dumps(
        {n: {**i, "rank": "4"} for n, i in _layers(m).items()})}, t),
    "bias-type": lambda m, t: ({**m, "svdkernels.layers": json.dumps(
        {n: {**i, "bias": 1} for n, i in _layers(m).items()})}, t),
    "down-owner": lambda m, t: ({**m, "svdkernels.layers": json.dumps(
        {n: {**i, "down": "nowhere"} for n, i in _layers(m).items()})}, t),
    "missing-tensor": lambda m, t: (m, {k: v for k, v in t.items() if not k.endswith(".up")}),
    "extra-tensor": lambda m, t: (m, {**t, "0.extra": torch.zeros(2)}),
    "shape": lambda m, t: (m, {k: (v[:-1] if k.endswith(".up") else v) for k, v in t.items()}),
    "dtype": lambda m, t: (m, {k: (v.double() if k.endswith(".up") else v) for k, v in t.items()}),
    "int-tensor": lambda m, t: (m, {k: (v.to(torch.int32) if k.endswith(".down") else v) for k, v in t.items()}),
    "nan": lambda m, t: (m, {k: (torch.full_like(v, float("nan")) if k.endswith(".down") else v)
                             for k, v in t.items()}),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupted_file_is_a_format_error_and_changes_nothing(saved, tmp_path, corruption):
    base, _, _, meta, tensors = saved
    path = _rewrite(tmp_path, *CORRUPTIONS[corruption](meta, tensors))
    target = copy.deepcopy(base)
    assert_rejected_file(load_compressed, target, path)
    assert all(isinstance(m, (nn.Linear, nn.Tanh, nn.Sequential)) for m in target.modules())


def test_not_a_safetensors_file(saved, tmp_path):
    base, _, path, _, _ = saved
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:100])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    for p in (truncated, garbage):
        with pytest.raises(FormatError, match="safetensors"):
            load_compressed(copy.deepcopy(base), p)
    with pytest.raises(FileNotFoundError):
        load_compressed(copy.deepcopy(base), tmp_path / "missing.safetensors")


def test_valid_file_still_loads_bit_identical(saved):
    base, model, path, _, _ = saved
    loaded = load_compressed(copy.deepcopy(base), path)
    assert any(isinstance(m, LowRankLinear) for m in loaded.modules())
    x = torch.randn(5, 16)
    assert torch.equal(model(x), loaded(x))


# ------------------------------------------------------------------ int4 factors


def _int4_model() -> nn.Module:
    torch.manual_seed(1)
    lowrank = LowRankLinear(torch.randn(48, 40) / 6, torch.randn(40, 128) / 11, torch.randn(48))
    return nn.Sequential(LowRankInt4Linear.from_lowrank(lowrank), nn.Tanh(), nn.Linear(48, 8))


def test_int4_factors_against_their_definition():
    # y = (x·deq(down)ᵀ)·deq(up)ᵀ + b, the rank padded with zeros (40 -> 64) exactly.
    from svdkernels.quant import dequantize_weight

    torch.manual_seed(2)
    lowrank = LowRankLinear(torch.randn(48, 40) / 6, torch.randn(40, 128) / 11, torch.randn(48))
    layer = LowRankInt4Linear.from_lowrank(lowrank)
    assert (layer.rank, layer.qdown.shape[0], layer.in_features, layer.out_features) == (40, 64, 128, 48)
    down = dequantize_weight(layer.qdown, layer.sdown, dtype=torch.float64)
    up = dequantize_weight(layer.qup, layer.sup, dtype=torch.float64)
    assert not down[40:].any() and not up[:, 40:].any()  # the padding is exact zeros
    x = torch.randn(6, 128)
    exact = (x.double() @ down.T) @ up.T + layer.bias.double()
    y = layer(x)
    # float32 accumulation of two products (K = 128, then 64 terms), rounded twice.
    bound = 2 * (128 + 64 + 2) * 2.0**-24 * ((x.double().abs() @ down.abs().T) @ up.abs().T + layer.bias.abs())
    assert bool(((y.double() - exact).abs() <= bound + 1e-12).all())
    # int4 factors of Gaussian factors: within a few int4 steps of the float layer.
    with torch.no_grad():
        rel = float((y - lowrank(x)).norm() / lowrank(x).norm())
    assert rel < 0.2, rel
    torch.testing.assert_close(layer.to_dense()(x), y, rtol=1e-5, atol=1e-5)


def test_int4_factors_bad_input():
    with pytest.raises(ValueError, match="in_features"):
        LowRankInt4Linear.from_lowrank(LowRankLinear(torch.randn(8, 4), torch.randn(4, 100)))
    with pytest.raises(TypeError, match="layer"):
        LowRankInt4Linear.from_lowrank(nn.Linear(64, 8))


def test_int4_factors_save_load_bit_identical(tmp_path):
    model = _int4_model()
    path = tmp_path / "int4.safetensors"
    save_compressed(model, path)
    target = nn.Sequential(nn.Linear(128, 48), nn.Tanh(), nn.Linear(48, 8))
    target[2].load_state_dict(model[2].state_dict())
    loaded = load_compressed(target, path)
    assert isinstance(loaded[0], LowRankInt4Linear) and loaded[0].rank == 40
    for key in ("qdown", "sdown", "qup", "sup", "bias"):
        assert torch.equal(getattr(loaded[0], key), getattr(model[0], key)), key
    x = torch.randn(3, 128)
    assert torch.equal(loaded(x), model(x))
    # A packed factor stored as float is a FormatError, the model untouched.
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    bad = _rewrite(tmp_path, meta, {k: (v.float() if k.endswith("qup") else v) for k, v in tensors.items()})
    fresh = nn.Sequential(nn.Linear(128, 48), nn.Tanh(), nn.Linear(48, 8))
    with pytest.raises(FormatError, match="uint8"):
        load_compressed(fresh, bad)
    assert isinstance(fresh[0], nn.Linear)
