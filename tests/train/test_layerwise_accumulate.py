"""layerwise: gradient accumulation in rank space, and the batched refresh of a shape
group with at most one group's gradients held."""
import copy
import io

import pytest
import torch
from torch import nn

from svdkernels.ops.lowrank_adam_step import lowrank_adam_step
from svdkernels.testing.errors import assert_raises_naming
from svdkernels.train import Int8Linear, LowRankAdamW, QGaLoreAdamW, layerwise, lowrank_param_groups
from svdkernels.train import projectors as proj
from svdkernels.train.projected_step import project_gradient, projected_adam_step

pytestmark = pytest.mark.usefixtures("one_thread")

K = 3  # micro-batches per step


def mlp(seed=0):
    """Projected weights [40, 24] (right side) and [16, 40] (left side)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 16), nn.GELU(), nn.Linear(16, 8))


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 24, generator=g), torch.randn(8, 8, generator=g)) for _ in range(n)]


def loss_of(model, x, y):
    return ((model(x) - y) ** 2).mean()


def make(model, gap, **options):
    groups = lowrank_param_groups(model, targets=["0", "2"], rank=4, update_gap=gap, scale=0.25, **options)
    return LowRankAdamW(groups, lr=1e-2, weight_decay=0.01, seed=3)


def low_rank(model):
    return [model[0].weight, model[2].weight]


def assert_same_weights(a, b, **tol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, msg=lambda m: f"{name}: {m}", **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("right", [True, False])
def test_the_projected_step_is_the_fused_step(dtype, right):
    torch.manual_seed(7)
    W, G = torch.randn(24, 20).to(dtype), torch.randn(24, 20).to(dtype)
    P = torch.linalg.qr(torch.randn(20 if right else 24, 4))[0].T.contiguous()  # [4, k]
    shape = (24, 4) if right else (4, 20)
    m, v = torch.randn(shape), torch.rand(shape)
    W2, m2, v2 = W.clone(), m.clone(), v.clone()
    kw = dict(betas=(0.9, 0.99), eps=1e-6, step_size=0.01, decay=0.001, sr_seed=11)
    lowrank_adam_step(W, G, P, m, v, side="right" if right else "left", **kw)
    projected_adam_step(W2, project_gradient(G, P, right), P, m2, v2, right=right, **kw)
    assert torch.equal(W, W2) and torch.equal(m, m2) and torch.equal(v, v2)


CONFIGS = [dict(projector="svd", moments="keep"), dict(projector="rsvd", moments="rotate", proj_bits=4),
           dict(projector="dct", moments="rotate")]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c["projector"])
def test_accumulation_equals_the_summed_gradient_between_refreshes(config):
    data = batches(1 + 2 * K)
    normal = mlp()
    o_normal = make(normal, gap=100, **config)
    loss_of(normal, *data[0]).backward()  # step 1 (the first refresh) on both, as usual
    o_normal.step()
    o_normal.zero_grad()
    lw = copy.deepcopy(normal)
    o_lw = make(lw, gap=100, **config)
    o_lw.load_state_dict(o_normal.state_dict())
    layerwise(lw, o_lw, accumulate=K)
    for i, (x, y) in enumerate(data[1:]):  # two windows, no refresh due
        loss_of(normal, x, y).backward()
        if (i + 1) % K == 0:
            o_normal.step()
            o_normal.zero_grad()
        loss_of(lw, x, y).backward()
        # No full-size gradient of a low-rank weight survives its hook; plain ones accumulate.
        assert all(p.grad is None for p in low_rank(lw))
        assert all((p.grad is not None) == ((i + 1) % K != 0) for p in (lw[0].bias, lw[4].weight))
    # P·(ΣG) against Σ P·G: equal up to float rounding.
    assert_same_weights(lw, normal, rtol=2e-5, atol=2e-6)
    assert o_lw.state[lw[0].weight]["step"] == 3 and "grad_acc" not in o_lw.state[lw[0].weight]


def test_a_refresh_window_takes_its_basis_from_the_first_micro_batch():
    data = batches(3 * K)
    normal, lw = mlp(), mlp()
    o_normal = make(normal, gap=2, projector="rsvd", moments="rotate")
    o_lw = make(lw, gap=2, projector="rsvd", moments="rotate")
    layerwise(lw, o_lw, accumulate=K)
    for i, (x, y) in enumerate(data):
        loss_of(normal, x, y).backward()
        window, micro = divmod(i, K)
        if micro == 0 and window in (0, 2):  # steps 0 and 2 refresh (gap 2): from this gradient alone
            o_normal.refresh()
        if micro == K - 1:
            o_normal.step()
            o_normal.zero_grad()
        loss_of(lw, x, y).backward()
    assert o_lw.state[lw[0].weight]["refreshes"] == 2
    assert_same_weights(lw, normal, rtol=2e-5, atol=2e-6)


def test_mid_window_state_dict_round_trip_is_bit_identical():
    data = batches(3 * K)
    run = mlp()
    opt = make(run, gap=2, projector="rsvd")
    layerwise(run, opt, accumulate=K)
    for x, y in data[:K + 2]:  # one window, then two micro-batches of the next
        loss_of(run, x, y).backward()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    st = saved["state"][0]
    assert st["micro_batch"] == 2 and st["grad_acc"].shape == (40, 4)  # the [40, 24] weight: right side
    resumed = mlp()
    resumed.load_state_dict(run.state_dict())
    for p, q in zip(resumed.parameters(), run.parameters()):  # plain params' partial sums live in .grad
        p.grad = None if q.grad is None else q.grad.clone()
    o_resumed = make(resumed, gap=2, projector="rsvd")
    o_resumed.load_state_dict(saved)
    layerwise(resumed, o_resumed, accumulate=K)
    for x, y in data[K + 2:]:  # ends the window, then a whole one with a refresh
        loss_of(run, x, y).backward()
        loss_of(resumed, x, y).backward()
    for p, q in zip(run.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert opt.state[run[0].weight]["refreshes"] == 2


def test_a_mismatched_accumulator_is_refused_by_name():
    run = mlp()
    opt = make(run, gap=2)
    layerwise(run, opt, accumulate=K)
    loss_of(run, *batches(1)[0]).backward()
    sd = opt.state_dict()
    sd["state"][0]["grad_acc"] = torch.zeros(40, 5)
    fresh = make(mlp(), gap=2)
    assert_raises_naming(lambda: fresh.load_state_dict(sd), ValueError, ["'0.weight'", "grad_acc", "[40, 4]"])


@pytest.mark.parametrize("skip", [False, True])
def test_a_nonfinite_micro_batch_raises_or_skips_the_window(skip):
    data = batches(2 * K)
    run = mlp()
    opt = make(run, gap=100)
    opt.skip_nonfinite = skip
    layerwise(run, opt, accumulate=K)
    for x, y in data[:K]:
        loss_of(run, x, y).backward()
    before = run[2].weight.detach().clone()
    poison = run[2].weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    if not skip:
        assert_raises_naming(lambda: loss_of(run, *data[K]).backward(), ValueError, ["'2.weight'", "non-finite"])
        return
    loss_of(run, *data[K]).backward()
    poison.remove()
    for x, y in data[K + 1:]:
        loss_of(run, x, y).backward()
    assert torch.equal(run[2].weight, before) and opt.skipped_steps == 1
    assert opt.state[run[2].weight]["step"] == 1 and opt.state[run[0].weight]["step"] == 2


# ---------------------------------------------------------------------- batched refresh


def stack(seed=0, blocks=3):
    """Blocks Linear(16, 24) -> Linear(24, 16): two shape groups of ``blocks`` members,
    [24, 16] and [16, 24], whose gradients arrive interleaved (block by block)."""
    torch.manual_seed(seed)
    layers = []
    for _ in range(blocks):
        layers += [nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 16), nn.Tanh()]
    return nn.Sequential(*layers)


def stack_opt(model, **options):
    return LowRankAdamW(lowrank_param_groups(model, rank=4, update_gap=3, **options), lr=1e-2, seed=5)


def spy_calls(monkeypatch):
    calls = []
    real = proj.bases_for

    def spy(projector, G, *args, **kwargs):
        calls.append(G.shape[0])
        return real(projector, G, *args, **kwargs)

    monkeypatch.setattr(proj, "bases_for", spy)
    return calls


class Parallel(nn.Module):
    """Three Linear(16, 24) on the same input: one shape group of 3."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.heads = nn.ModuleList(nn.Linear(16, 24) for _ in range(3))

    def forward(self, x):
        return sum(h(x).tanh().square().mean() for h in self.heads)


def test_layerwise_refreshes_a_shape_group_with_one_batched_call(monkeypatch):
    calls = spy_calls(monkeypatch)
    plain, lw = Parallel(), Parallel()
    o_plain, o_lw = stack_opt(plain), stack_opt(lw)
    x = torch.randn(8, 16)
    for _ in range(7):
        o_plain.zero_grad()
        plain(x).backward()
        o_plain.step()
    assert calls == [3, 3, 3]  # step(): steps 0, 3 and 6, one batched call each
    calls.clear()
    layerwise(lw, o_lw)
    for _ in range(7):
        lw(x).backward()
    assert calls == [3, 3, 3]  # layerwise: the same
    # The same batch and seed as step(): the same weights.
    assert_same_weights(lw, plain, rtol=1e-6, atol=1e-7)


def test_layerwise_holds_at_most_one_shape_group(monkeypatch):
    calls = spy_calls(monkeypatch)
    model = stack()
    opt = stack_opt(model)
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    live = []
    # Registered before layerwise's hooks, so it runs first: it sees the held gradients
    # plus the arriving one.
    for w in weights:
        w.register_post_accumulate_grad_hook(lambda p: live.append(sum(q.grad is not None for q in weights)))
    handle = layerwise(model, opt)
    x = torch.randn(8, 16)
    for _ in range(7):
        model(x).square().mean().backward()
    # Step 0: the [16, 24] group arrives first and is held; the [24, 16] weights have no
    # basis yet and are refreshed alone. Step 3: the [16, 24] group is refreshed, the
    # other is put off to step 4; step 6: the [16, 24] group again (gap 3).
    assert calls == [1, 1, 3, 1, 3, 3, 3]
    assert handle.refresh_deferred == 3
    assert max(live) == 3 < len(weights)  # one shape group's gradients, never all six
    assert all(opt.state[w]["refreshes"] == (3 if w.shape == (16, 24) else 2) for w in weights)
    assert all(w.grad is None for w in weights)


def test_a_group_member_without_gradient_does_not_stall_the_refresh(monkeypatch):
    calls = spy_calls(monkeypatch)
    model = stack(blocks=2)
    opt = stack_opt(model)
    handle = layerwise(model, opt)
    x = torch.randn(8, 16)
    for _ in range(3):
        model(x).square().mean().backward()
    assert calls == [1, 2, 1]  # step 0 (see the test above)
    # Step 3 through the first block only: its [16, 24] weight is held for a group member
    # that gets no gradient; the end of backward refreshes what arrived.
    model[:4](x).square().mean().backward()
    assert calls == [1, 2, 1, 1] and handle.refresh_deferred == 1
    assert model[2].weight.grad is None and opt.state[model[2].weight]["refreshes"] == 2


def test_layerwise_refuses_a_process_group_by_name():
    model = stack(blocks=1)
    opt = stack_opt(model)
    opt.process_group = object()  # what the DDP path sets; layerwise's refresh is not collective
    assert_raises_naming(lambda: layerwise(model, opt), ValueError, ["optimizer", "process_group"])


def test_int8_weights_accumulate_in_rank_space():
    torch.manual_seed(3)
    model = nn.Sequential(Int8Linear.from_linear(nn.Linear(24, 40)), nn.GELU(), nn.Linear(40, 8))
    opt = QGaLoreAdamW(lowrank_param_groups(model, targets=["0"], rank=4, update_gap=5), lr=3e-2)
    layerwise(model, opt, accumulate=2)
    x, y = torch.randn(16, 24), torch.randn(16, 8)
    losses = []
    for _ in range(40):
        loss = loss_of(model, x, y)
        (loss / 2).backward()
        assert model[0].qweight.float_grad is None  # freed in the hook, the sum is rank-space
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert opt.state[model[0].qweight]["step"] == 20


def test_a_nonfinite_first_micro_batch_before_any_basis_skips_that_window_only():
    data = batches(2 * K)
    run = mlp()
    opt = make(run, gap=100)
    opt.skip_nonfinite = True
    layerwise(run, opt, accumulate=K)
    before = run[0].weight.detach().clone()
    poison = run[0].weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    loss_of(run, *data[0]).backward()  # the first micro-batch of all: no basis exists yet
    poison.remove()
    for x, y in data[1:K]:
        loss_of(run, x, y).backward()
    assert torch.equal(run[0].weight, before) and opt.skipped_steps == 1
    assert "basis" not in opt.state[run[0].weight]
    for x, y in data[K:]:  # the next window refreshes (still due) and steps
        loss_of(run, x, y).backward()
    assert opt.state[run[0].weight]["step"] == 1 and opt.state[run[0].weight]["refreshes"] == 1
    assert not torch.equal(run[0].weight, before)
