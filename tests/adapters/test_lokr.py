"""peft LoKr adapters load into KronLinear with peft's outputs, and save back."""
import copy
import json

import pytest
import torch
from torch import nn

from svdkernels.adapters import KronLinear, load_lokr, save_lokr

peft = pytest.importorskip("peft")
from peft import LoKrConfig, PeftModel, get_peft_model  # noqa: E402


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(64, 96)
        self.k = nn.Linear(64, 64, bias=False)
        self.o = nn.Linear(96, 40)

    def forward(self, x):
        return self.o(torch.relu(self.q(x))) + self.k(x).sum(-1, keepdim=True)


def peft_adapter(base, path, **cfg):
    torch.manual_seed(3)
    model = get_peft_model(copy.deepcopy(base), LoKrConfig(init_weights=False, **cfg))
    model.save_pretrained(path)
    return PeftModel.from_pretrained(copy.deepcopy(base), path).eval()


@pytest.mark.parametrize("decompose_both", [False, True])
@pytest.mark.parametrize("r", [2, 16], ids=["r2-lowrank", "r16-dense"])
@pytest.mark.parametrize("factor", [-1, 4])
def test_load_matches_peft_and_save_round_trips(tmp_path, decompose_both, r, factor):
    torch.manual_seed(0)
    base = Toy()
    want_model = peft_adapter(base, tmp_path / "peft", r=r, alpha=3, target_modules=["q", "k", "o"],
                              decompose_both=decompose_both, decompose_factor=factor,
                              rank_pattern={"o": 4}, alpha_pattern={"k": 7})
    x = torch.randn(5, 64)
    want = want_model(x)
    ours = load_lokr(copy.deepcopy(base), tmp_path / "peft")
    assert all(isinstance(ours.get_submodule(n), KronLinear) for n in ("q", "k", "o"))
    torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-5)
    save_lokr(ours, tmp_path / "ours", decompose_factor=factor)
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(back(x), want, rtol=1e-6, atol=1e-6)
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LOKR"


def test_real_model_minilm(tmp_path):
    transformers = pytest.importorskip("transformers")
    from svdkernels.testing.models import minilm_dir

    torch.manual_seed(0)
    base = transformers.AutoModel.from_pretrained(str(minilm_dir())).eval()
    want_model = peft_adapter(base, tmp_path / "peft", r=8, alpha=16,
                              target_modules=["query", "value", "intermediate.dense"])
    ids = torch.randint(1000, 5000, (2, 11))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = want_model(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = load_lokr(copy.deepcopy(base), tmp_path / "peft")
        n_kron = sum(isinstance(m, KronLinear) for m in ours.modules())
        got = ours(input_ids=ids, attention_mask=mask).last_hidden_state
    assert n_kron == 18  # 6 layers x (query, value, intermediate.dense)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # And the model actually changed: the adapter is not a no-op.
    with torch.no_grad():
        plain = base(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (plain - want).abs().max() > 1e-2


def test_save_refuses_what_lokr_cannot_hold(tmp_path):
    model = nn.Sequential(nn.Linear(16, 16))
    model[0] = KronLinear(model[0], a_shape=(4, 4), b_shape=(4, 4), rank=2)  # SoKA, 2 terms
    with pytest.raises(ValueError, match="2 Kronecker terms"):
        save_lokr(model, tmp_path)
    model[0] = KronLinear(model[0].base, a_shape=(2, 8), b_shape=(8, 2), init="lokr")
    with pytest.raises(ValueError, match="factor shapes"):
        save_lokr(model, tmp_path)
    with pytest.raises(ValueError, match="no KronLinear|at least one KronLinear"):
        save_lokr(nn.Linear(4, 4), tmp_path)


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="adapter_config.json"):
        load_lokr(Toy(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="LOKR"):
        load_lokr(Toy(), tmp_path)
