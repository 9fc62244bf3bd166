"""AnnealedWeightDecay (SoMA) and KindLinear argument checks found by tests/fuzz/test_fuzz_train.py."""
import pytest
import torch
from torch import nn

from svdkernels.adapters.soma import AnnealedWeightDecay
from svdkernels.testing.errors import assert_raises_naming


def opt():
    return torch.optim.AdamW(nn.Linear(3, 2).parameters(), weight_decay=0.1)


@pytest.mark.parametrize("groups", [3, "0"])
def test_groups_must_be_indices(groups):
    # 3 raised "'int' object is not iterable"; "0" was read character by character
    assert_raises_naming(lambda: AnnealedWeightDecay(opt(), start=0.1, total_steps=3, groups=groups), TypeError,
                         ["groups", "indices"])


@pytest.mark.parametrize("state", [{}, {"step_count": "x"}, {"step_count": -1}, 3, None])
def test_load_state_dict_checks_the_state(state):
    # were KeyError, "invalid literal for int()", a negative step accepted, TypeError on subscripting
    sched = AnnealedWeightDecay(opt(), start=0.1, total_steps=3)
    sched.step()
    assert_raises_naming(lambda: sched.load_state_dict(state), ValueError, ["state", "step_count"])
    assert sched.step_count == 1
    sched.load_state_dict({"step_count": 3})
    assert sched.optimizer.param_groups[0]["weight_decay"] == sched.value() == 0.0


@pytest.mark.parametrize("x", [torch.randn(3, 7), torch.randn(6), torch.ones(3, 6, dtype=torch.int64)])
def test_kind_linear_names_a_bad_x(x):
    """(KIND, found by the same fuzz) was "mat1 and mat2 shapes cannot be multiplied" or
    a class_ids error for an x of the wrong shape."""
    import svdkernels

    torch.manual_seed(0)
    model = svdkernels.adapt(nn.Sequential(nn.Linear(6, 6), nn.Tanh()), "kind", rank=2, tailor_rank=2, classes=2)
    ids = torch.tensor([0, 1, 0])
    assert_raises_naming(lambda: model[0](x, ids), ValueError, ["x", "[batch, ..., 6]"])
    assert model[0](torch.randn(3, 6), ids).shape == (3, 6)


@pytest.mark.parametrize("gate", ["extra_class", "shared_component"])
def test_load_kind_refuses_a_gate_kind_adapt_cannot_write(tmp_path, gate):
    """A gate with a duplicated class row (3 classes on 2 tailors) or a component owned by
    two classes loaded silently; kind_adapt's gate is class_gate(classes, tailors)."""
    import copy

    import svdkernels
    from svdkernels.adapters import load_kind, save_kind
    from svdkernels.testing.files import assert_rejected_file, rewrite_safetensors

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
    save_kind(svdkernels.adapt(copy.deepcopy(base), "kind", rank=2, tailor_rank=2, classes=2), tmp_path / "k.safetensors")

    def edit(t):
        g = t["0.tailor_gate"]
        t["0.tailor_gate"] = torch.cat([g, g[:1]]) if gate == "extra_class" else torch.ones_like(g)

    bad = rewrite_safetensors(tmp_path / "k.safetensors", tmp_path / "bad.safetensors", tensors=edit)
    assert_rejected_file(load_kind, copy.deepcopy(base), bad, ["tailor_gate", "class_gate(", "2)"])
    load_kind(copy.deepcopy(base), tmp_path / "k.safetensors")  # the intact file still loads
