"""Adapters exported to peft's LoRA format reproduce our outputs in PeftModel."""
from __future__ import annotations

import json

import pytest
import torch

peft = pytest.importorskip("peft")

from svdkernels.adapters import adapt, export_peft_lora, mark_only_adapter_trainable  # noqa: E402

from svdkernels.testing.adapters import calib_batches, inputs, perturb, toy_model  # noqa: E402

CALIB = ("corda", "eva")


@pytest.mark.parametrize("method", ["lora", "pissa", "milora", "corda", "eva"])
def test_peft_reproduces_exported_adapter(method, tmp_path):
    model = adapt(toy_model(), method, rank=8, alpha=16.0, targets=["0", "2", "4"],
                  calib_batches=calib_batches() if method in CALIB else None)
    perturb(mark_only_adapter_trainable(model))  # as after training: B != 0, A moved away from its init
    export_peft_lora(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    peft_model = peft.PeftModel.from_pretrained(toy_model(), str(tmp_path))
    x = inputs()
    y, y_peft = model(x), peft_model(x)
    assert (y - toy_model()(x)).abs().max() > 1e-2  # the adapter does change the outputs
    # fp32, the residual's rank-2r correction applied as a LoRA instead of folded into the weight.
    torch.testing.assert_close(y_peft, y, rtol=1e-5, atol=2e-5)


def test_export_refuses_non_lora_methods(tmp_path):
    model = adapt(toy_model(), "svfit", rank=8)
    with pytest.raises(ValueError, match="svfit"):
        export_peft_lora(model, tmp_path)
