"""SoMA: minor-component adapter outside the frozen blocks (outputs unchanged at init,
merge, save/load bit-identical), the block selection, the annealed weight decay."""
import math

import pytest
import torch
from torch import nn

from svdkernels.adapters import adapter_layers, load_adapter, save_adapter
from svdkernels.adapters.soma import AnnealedWeightDecay, adapt_soma, block_index, soma_targets
from svdkernels.testing.errors import assert_raises_naming

pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.tanh(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, d=12, blocks=4):
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(blocks))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return self.head(x)


def _net(seed=0):
    torch.manual_seed(seed)
    return Net()


def test_block_selection():
    assert block_index("encoder.layer.3.attention.query") == 3 and block_index("head") is None
    m = _net()
    assert soma_targets(m, 2) == ["layers.2.fc1", "layers.2.fc2", "layers.3.fc1", "layers.3.fc2", "head"]
    assert soma_targets(m, [0, 3]) == ["layers.1.fc1", "layers.1.fc2", "layers.2.fc1", "layers.2.fc2", "head"]
    assert soma_targets(m, 0, targets=r".*fc1") == [f"layers.{i}.fc1" for i in range(4)]
    assert_raises_naming(lambda: soma_targets(m, 5), ValueError, ["freeze_blocks", "<= 4", "5"])
    assert_raises_naming(lambda: soma_targets(m, [7]), ValueError, ["freeze_blocks", "[0, 1, 2, 3]", "[7]"])
    assert_raises_naming(lambda: soma_targets(m, 4, targets=r"layers.*"), ValueError, ["freeze_blocks", "no linear"])
    assert_raises_naming(lambda: soma_targets(m, True), TypeError, ["freeze_blocks", "True"])


def test_adapter_minor_components_frozen_blocks_and_unchanged_outputs():
    m, ref = _net(), _net()
    x = torch.randn(5, 12)
    adapt_soma(m, rank=3, freeze_blocks=2)
    torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
    layers = adapter_layers(m)
    assert sorted(layers) == sorted(soma_targets(ref, 2))
    for n, p in m.named_parameters():  # the early blocks are frozen whole; only the branches train
        assert p.requires_grad == (n.startswith(("layers.2", "layers.3", "head")) and "lora_" in n), n
    W = ref.get_submodule("layers.3.fc1").weight.detach()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    minor = U[:, -3:] * S[-3:] @ Vh[-3:]
    torch.testing.assert_close(layers["layers.3.fc1"].delta_weight(), minor, rtol=1e-4, atol=1e-5)


def test_merge_and_save_load(tmp_path):
    m = adapt_soma(_net(), rank=2, freeze_blocks=1)
    with torch.no_grad():
        for layer in adapter_layers(m).values():
            layer.lora_B.add_(0.1 * torch.randn_like(layer.lora_B))
    x = torch.randn(4, 12)
    y = m(x)
    save_adapter(m, tmp_path / "soma.safetensors")
    loaded = load_adapter(_net(), tmp_path / "soma.safetensors")
    assert torch.equal(loaded(x), y)
    for layer in adapter_layers(m).values():
        layer.merge()
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
    for layer in adapter_layers(m).values():
        layer.unmerge()
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_annealed_weight_decay_values(schedule):
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [nn.Parameter(torch.ones(1))], "weight_decay": 0.0}])
    sched = AnnealedWeightDecay(opt, start=0.2, end=0.02, total_steps=10, schedule=schedule, groups=[0])
    f = (lambda t: 0.5 * (1 + math.cos(math.pi * t))) if schedule == "cosine" else (lambda t: 1 - t)
    seen = [opt.param_groups[0]["weight_decay"]]
    for _ in range(12):
        seen.append(sched.step())
        assert opt.param_groups[0]["weight_decay"] == seen[-1]
    want = [0.02 + 0.18 * f(min(t, 10) / 10) for t in range(13)]
    assert seen == pytest.approx(want, rel=1e-12)
    assert opt.param_groups[1]["weight_decay"] == 0.0  # an unscheduled group is untouched
    state = sched.state_dict()
    other = AnnealedWeightDecay(opt, start=0.2, end=0.02, total_steps=10, schedule=schedule, groups=[0])
    other.load_state_dict(state)
    assert opt.param_groups[0]["weight_decay"] == seen[-1]


def test_the_optimiser_reads_the_schedule():
    p = nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([p], lr=0.1)
    sched = AnnealedWeightDecay(opt, start=0.5, total_steps=4)
    for _ in range(4):
        wd = opt.param_groups[0]["weight_decay"]
        before = p.detach().clone()
        p.grad = torch.zeros(4)  # no gradient: AdamW's step is the decoupled decay alone
        opt.step()
        torch.testing.assert_close(p.detach(), before * (1 - 0.1 * wd))
        sched.step()
    assert opt.param_groups[0]["weight_decay"] == 0.0


def test_schedule_errors():
    opt = torch.optim.AdamW([nn.Parameter(torch.ones(1))])
    assert_raises_naming(lambda: AnnealedWeightDecay(opt, start=-1.0, total_steps=3), ValueError, ["start", "-1.0"])
    assert_raises_naming(lambda: AnnealedWeightDecay(opt, start=0.1, total_steps=0), ValueError,
                         ["total_steps", ">= 1", "0"])
    assert_raises_naming(lambda: AnnealedWeightDecay(opt, start=0.1, total_steps=3, schedule="step"), ValueError,
                         ["schedule", "'cosine'", "'step'"])
    assert_raises_naming(lambda: AnnealedWeightDecay(opt, start=0.1, total_steps=3, groups=[1]), ValueError,
                         ["groups", "[0, 1)", "[1]"])
    assert_raises_naming(lambda: AnnealedWeightDecay("adam", start=0.1, total_steps=3), TypeError,
                         ["optimizer", "str"])
    plain = torch.optim.Adadelta([nn.Parameter(torch.ones(1))])
    del plain.param_groups[0]["weight_decay"]
    assert_raises_naming(lambda: AnnealedWeightDecay(plain, start=0.1, total_steps=3), ValueError,
                         ["optimizer", "weight_decay"])


def test_adapt_soma_is_adapt_soma():
    """``svdkernels.adapt(model, "soma", freeze_blocks=k)`` equals adapt_soma: same layers
    adapted (the first k blocks left alone), same factors, same trainable set."""
    from svdkernels import adapt

    via_adapt, direct = adapt(_net(), "soma", rank=3, freeze_blocks=2), adapt_soma(_net(), rank=3, freeze_blocks=2)
    assert sorted(adapter_layers(via_adapt)) == sorted(adapter_layers(direct)) == sorted(soma_targets(_net(), 2))
    assert all(layer.method == "soma" for layer in adapter_layers(via_adapt).values())
    for (n, p), (n2, q) in zip(via_adapt.named_parameters(), direct.named_parameters()):
        assert n == n2 and p.requires_grad == q.requires_grad, n
        torch.testing.assert_close(p, q, rtol=0, atol=0)
