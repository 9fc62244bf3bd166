"""KIND: learngenes (shared) and class-gated tailors from each weight's SVD; outputs
unchanged at init, class isolation of the tailors, training with class labels,
extract_learngenes, save/load bit-identical, clear errors."""
import pytest
import torch
from torch import nn

from svdkernels.adapters.kind import (
    KindLinear,
    class_gate,
    extract_learngenes,
    kind_adapt,
    kind_classes,
    kind_layers,
    load_kind,
    save_kind,
)
from svdkernels.testing.errors import assert_raises_naming
from svdkernels.testing.files import rewrite_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 10))


def _kind(seed=0, **kw):
    return kind_adapt(_net(seed), **{"rank": 3, "tailor_rank": 4, "classes": 2, **kw})


def test_gate_and_unchanged_outputs():
    assert class_gate(2, 5).tolist() == [[True, False, True, False, True], [False, True, False, True, False]]
    m, ref = _kind(), _net()
    x, c = torch.randn(6, 10), torch.tensor([0, 1, 0, 1, 1, 0])
    with kind_classes(m, c):
        torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-6)
    layer = m[0]
    assert isinstance(layer, KindLinear) and layer.rank == 3 and layer.tailor_rank == 4
    # learngenes: the top components of the weight (rsvd), the residual the rest
    S = torch.linalg.svdvals(ref[0].weight.detach())
    torch.testing.assert_close(layer.kind_S, S[:3], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(layer.learngene_weight(), ref[0].weight.detach(), rtol=1e-5, atol=1e-6)
    trainable = {n.split(".")[-1] for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"kind_U", "kind_S", "kind_V", "tailor_U", "tailor_S", "tailor_V"}


def test_tailors_are_class_isolated():
    m = _kind()
    with torch.no_grad():
        for layer in kind_layers(m).values():
            layer.tailor_S.fill_(0.5)
    x = torch.randn(4, 10)
    with kind_classes(m, torch.zeros(4, dtype=torch.long)):
        m(x).pow(2).sum().backward()
    gate = class_gate(2, 4)
    for layer in kind_layers(m).values():
        g = layer.tailor_S.grad
        assert (g[~gate[0]] == 0).all() and (g[gate[0]] != 0).all()
        assert (layer.tailor_U.grad[:, ~gate[0]] == 0).all() and (layer.kind_S.grad != 0).all()
    # per-sample gating: a mixed batch equals each class's rows run alone
    c = torch.tensor([0, 1, 1, 0])
    y = m[0](x, c)
    torch.testing.assert_close(y[c == 1], m[0](x[c == 1], c[c == 1]))
    assert not torch.allclose(m[0](x, torch.zeros(4, dtype=torch.long)), m[0](x, torch.ones(4, dtype=torch.long)))
    x3 = torch.randn(4, 5, 10)  # [batch, tokens, in]
    torch.testing.assert_close(m[0](x3, c)[1], m[0](x3[1], c[1].repeat(5)))


def test_trains_with_class_labels_and_extracts_learngenes():
    torch.manual_seed(1)
    m = _kind(rank=3, tailor_rank=4, classes=2)
    teacher = [_net(s) for s in (5, 6)]  # each class its own map
    x = torch.randn(256, 10)
    c = torch.arange(256) % 2
    with torch.no_grad():
        target = torch.where(c[:, None] == 0, teacher[0](x), teacher[1](x))
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)

    def loss():
        with kind_classes(m, c):
            return (m(x) - target).pow(2).mean()

    first = float(loss().detach())
    for _ in range(150):
        opt.zero_grad()
        out = loss()
        out.backward()
        opt.step()
    assert float(loss().detach()) < 0.5 * first
    assert all(float(layer.tailor_S.detach().abs().max()) > 0 for layer in kind_layers(m).values())
    new = extract_learngenes(m)
    assert not kind_layers(new) and all(p.requires_grad for p in new.parameters())
    with torch.no_grad():
        for layer in kind_layers(m).values():
            layer.tailor_S.zero_()  # the class-agnostic part alone
        with kind_classes(m, c):
            want = m(x)
    torch.testing.assert_close(new(x), want, rtol=1e-5, atol=1e-5)
    again = kind_adapt(new, rank=2, tailor_rank=3, classes=3)  # a new model for new classes
    with kind_classes(again, torch.arange(4) % 3):
        torch.testing.assert_close(again(x[:4]), want[:4], rtol=1e-4, atol=1e-5)


def test_save_load_bit_identical(tmp_path):
    m = _kind()
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    x, c = torch.randn(5, 10), torch.tensor([1, 0, 1, 1, 0])
    path = tmp_path / "kind.safetensors"
    save_kind(m, path)
    loaded = load_kind(_net(), path)
    with kind_classes(m, c), kind_classes(loaded, c):
        assert torch.equal(loaded(x), m(x))
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == \
        [n for n, p in m.named_parameters() if p.requires_grad]
    bad = tmp_path / "bad.safetensors"
    rewrite_safetensors(path, bad, tensors=lambda t: t.update({"2.tailor_U": t["2.tailor_U"][:, :2].contiguous()}))
    before = _net()
    with pytest.raises(ValueError, match=r"'2.tailor_U': expected shape \[10, 4\], got \[10, 2\]"):
        load_kind(before, bad)
    assert type(before[0]) is nn.Linear and type(before[2]) is nn.Linear  # untouched
    rewrite_safetensors(path, bad, tensors=lambda t: t["0.kind_S"].fill_(float("nan")))
    with pytest.raises(ValueError, match="'0.kind_S': expected finite"):
        load_kind(_net(), bad)
    rewrite_safetensors(path, bad, tensors=lambda t: t.pop("2.kind_V"))
    with pytest.raises(ValueError, match="missing \\['kind_V'\\]"):
        load_kind(_net(), bad)
    with pytest.raises(ValueError, match="model"):
        load_kind(nn.Sequential(nn.Linear(10, 12)), path)


def test_errors():
    net = _net()
    assert_raises_naming(lambda: kind_adapt(net, rank=3, tailor_rank=1, classes=2), ValueError,
                         ["tailor_rank", "classes = 2", "1"])
    assert_raises_naming(lambda: kind_adapt(net, rank=8, tailor_rank=4, classes=2), ValueError,
                         ["rank", "<= 10", "8 + 4"])
    assert_raises_naming(lambda: kind_adapt(net, rank=0, tailor_rank=4, classes=2), ValueError, ["rank", ">= 1"])
    assert_raises_naming(lambda: kind_adapt(net, rank=2.0, tailor_rank=4, classes=2), TypeError, ["rank", "float"])
    m = _kind()
    x = torch.randn(3, 10)
    assert_raises_naming(lambda: m(x), ValueError, ["class_ids", "None"])
    assert_raises_naming(lambda: m[0](x, torch.tensor([0, 1])), ValueError, ["class_ids", "[3, 10]", "[2]"])
    assert_raises_naming(lambda: m[0](x, torch.tensor([0, 1, 2])), ValueError, ["class_ids", "[0, 2)", "2]"])
    assert_raises_naming(lambda: m[0](x, torch.tensor([0.0, 1.0, 1.0])), ValueError, ["class_ids", "float32"])
    assert_raises_naming(lambda: extract_learngenes(_net()), ValueError, ["model", "kind_adapt"])


def test_adapt_kind_is_kind_adapt():
    """``svdkernels.adapt(model, "kind", ...)`` builds the same layers as kind_adapt and
    trains only their components."""
    from svdkernels import adapt

    via_adapt, direct = adapt(_net(), "kind", rank=3, tailor_rank=4, classes=2), _kind()
    assert isinstance(via_adapt[0], KindLinear) and isinstance(via_adapt[2], KindLinear)
    for (n, p), (n2, q) in zip(via_adapt.named_parameters(), direct.named_parameters()):
        assert n == n2 and p.requires_grad == q.requires_grad, n
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    with pytest.raises(TypeError, match="tailor_rnk"):
        adapt(_net(), "kind", rank=3, tailor_rnk=4, classes=2)
