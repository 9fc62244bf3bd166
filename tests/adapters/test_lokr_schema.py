"""Issue 12: load_lokr checks the adapter (config and tensors) before changing the model."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from svdkernels.adapters import KronLinear, load_lokr, save_lokr
from svdkernels.errors import FormatError
from svdkernels.testing.files import assert_rejected_file


def base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 40))


@pytest.fixture
def adapter(tmp_path):
    model = base()
    model[0] = KronLinear(model[0], init="lokr", rank=1, b_rank=2, seed=0)
    model[2] = KronLinear(model[2], init="lokr", rank=1, seed=1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    save_lokr(model, tmp_path / "ok")
    return model, tmp_path / "ok"


def _copy(src, dst, config=None, tensors=None):
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    t = load_file(src / "adapter_model.safetensors")
    if config:
        config(cfg)
    if tensors:
        tensors(t)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(t, dst / "adapter_model.safetensors")
    return dst


K0, K2 = "base_model.model.0", "base_model.model.2"
CORRUPTIONS = {
    "nan-alpha": (dict(config=lambda c: c.update(alpha=math.nan)), ["alpha", "nan"]),
    "nan-alpha-pattern": (dict(config=lambda c: c["alpha_pattern"].update({next(iter(c["alpha_pattern"])): math.inf})),
                          ["alpha_pattern", "inf"]),
    "zero-r": (dict(config=lambda c: c.update(r=0)), ["r", "positive"]),
    "bad-regex": (dict(config=lambda c: c["rank_pattern"].update({"(": 2})), ["rank_pattern", "regex"]),
    "r-as-str": (dict(config=lambda c: c["rank_pattern"].update({k: "2" for k in c["rank_pattern"]})),
                 ["rank_pattern", "'2'"]),
    "nan-factor": (dict(tensors=lambda t: t[f"{K2}.lokr_w1"].view(-1)[0].fill_(math.nan)), ["lokr_w1", "finite"]),
    "wrong-shape": (dict(tensors=lambda t: t.update({f"{K2}.lokr_w1": torch.zeros(3, 3)})), ["lokr_w1", "[3, 3]"]),
    "both-layouts": (dict(tensors=lambda t: t.update({f"{K0}.lokr_w2": torch.zeros(12, 8)})), ["lokr_w2"]),
    "missing-factor": (dict(tensors=lambda t: t.pop(f"{K2}.lokr_w2")), ["'2'", "lokr_w2"]),
    "unknown-tensor": (dict(tensors=lambda t: t.update({"base_model.model.0.weight": torch.zeros(1)})),
                       ["unexpected", "0.weight"]),
    "conv": (dict(config=lambda c: c.update(use_effective_conv2d=True)), ["use_effective_conv2d"]),
    "not-lokr": (dict(config=lambda c: c.update(peft_type="LORA")), ["LOKR", "LORA"]),
    "int-factor": (dict(tensors=lambda t: t.update({f"{K2}.lokr_w1": t[f"{K2}.lokr_w1"].to(torch.int32)})),
                   ["lokr_w1", "floating"]),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_adapters_are_rejected_and_change_nothing(adapter, tmp_path, case):
    _, good = adapter
    edits, words = CORRUPTIONS[case]
    bad = _copy(good, tmp_path / "bad", **edits)
    model = base()
    assert_rejected_file(load_lokr, model, bad, words)
    assert all(type(m) is not KronLinear for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # not even frozen


@pytest.mark.parametrize("what", ["config", "weights"])
def test_unreadable_files_are_wrapped(adapter, tmp_path, what):
    _, good = adapter
    bad = _copy(good, tmp_path / "bad")
    if what == "config":
        (bad / "adapter_config.json").write_text('{"peft_type": "LOKR", ')
    else:
        (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(FormatError, match="JSON" if what == "config" else "safetensors"):
        load_lokr(base(), bad)
    with pytest.raises(FormatError, match="adapter_config.json"):
        load_lokr(base(), tmp_path / "nowhere")


def test_valid_adapter_loads(adapter):
    model, good = adapter
    back = load_lokr(base(), good)
    x = torch.randn(3, 64)
    torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)
