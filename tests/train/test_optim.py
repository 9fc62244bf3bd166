"""LowRankAdamW and its presets: GaLore equivalence, projectors, moments, state, bad input."""
import copy
import io
import warnings

import pytest
import torch
from torch import nn

from svdkernels.testing.errors import assert_raises_naming
from svdkernels.train import DCTAdamW, GaLoreAdamW, LowRankAdamW, QGaLoreAdamW, lowrank_param_groups
from svdkernels.train import projectors as proj

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(seed=0):
    """Two projected shapes: [40, 24] (m >= n: right side) and [16, 40] (left side)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 16), nn.GELU(), nn.Linear(16, 8))


def data(seed=1, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 24, generator=g), torch.randn(n, 8, generator=g)


def train(model, opt, steps, X, Y, start=0):
    for _ in range(start, steps):
        opt.zero_grad()
        loss = ((model(X) - Y) ** 2).mean()
        loss.backward()
        opt.step()
    return loss.item()


def galore_groups(model, rank=4, gap=3):
    low = [model[0].weight, model[2].weight]
    rest = [p for p in model.parameters() if all(p is not q for q in low)]
    return [dict(params=rest), dict(params=low, rank=rank, update_proj_gap=gap, scale=0.25, proj_type="std")]


def test_galore_preset_reproduces_galore_torch():
    galore_torch = pytest.importorskip("galore_torch")
    model = mlp()
    theirs = copy.deepcopy(model)
    ours_opt = GaLoreAdamW(galore_groups(model), lr=1e-2, weight_decay=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # galore-torch's AdamW warns that it is deprecated
        their_opt = galore_torch.GaLoreAdamW(galore_groups(theirs), lr=1e-2, weight_decay=0.1)
    X, Y = data()
    # Refreshes at steps 0, 3, 6 and 9 (gap 3): three switches of basis with the moments
    # kept, on both sides (the [40, 24] weight right, the [16, 40] weight left).
    for _ in range(10):
        for m, o in ((model, ours_opt), (theirs, their_opt)):
            o.zero_grad()
            ((m(X) - Y) ** 2).mean().backward()
            o.step()
    assert ours_opt.state[model[0].weight]["refreshes"] == 4
    for a, b in zip(model.parameters(), theirs.parameters()):
        # fp32: the same SVDs and products; the step size and scale are multiplied in
        # another order (one rounding per step), ~1e-7 after 10 steps of |W| ~ 0.2.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(model[0].weight, mlp()[0].weight)  # it did train


def test_one_batched_factorisation_per_shape_group(monkeypatch):
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(3)], nn.Linear(16, 24))
    calls = []
    real = proj.rsvd_bases

    def counting(G, *args, **kwargs):
        calls.append(tuple(G.shape))
        return real(G, *args, **kwargs)

    monkeypatch.setattr(proj, "rsvd_bases", counting)
    opt = LowRankAdamW(lowrank_param_groups(model, rank=4), projector="rsvd")
    x = torch.randn(8, 16)
    model(x).square().sum().backward()
    opt.step()
    # Three [16, 16] weights in one call, the [24, 16] weight in another.
    assert sorted(calls) == [(1, 24, 16), (3, 16, 16)]


@pytest.mark.parametrize("right", [True, False], ids=["right", "left"])
@pytest.mark.parametrize("projector", ["svd", "rsvd", "rsvd-warm", "dct"])
def test_bases_have_orthonormal_rows(projector, right):
    torch.manual_seed(3)
    G = torch.randn(3, 30, 20)
    r, k = 5, 20 if right else 30
    if projector == "dct":
        P = proj.dct_bases(proj.dct_indices(G, r, right), k)
    elif projector == "rsvd-warm":
        P = proj.warm_subspace(G, proj.svd_bases(G + 0.1 * torch.randn_like(G), r, right), r, right, seed=0)
    else:
        P = proj.bases_for(projector, G, r, right, seed=0)
    assert P.shape == (3, r, k)
    torch.testing.assert_close(P @ P.mT, torch.eye(r).expand(3, r, r), rtol=0, atol=2e-6)  # fp32 QR/SVD


def test_random_basis_is_seeded_and_scaled():
    P = proj.random_basis(7, 64, 4096, torch.device("cpu"))
    assert torch.equal(P, proj.random_basis(7, 64, 4096, torch.device("cpu")))
    # Not orthonormal (APOLLO): rows of N(0, 1/r) entries, so P·Pᵀ ≈ (k/r)·I on average.
    assert abs((P @ P.T).diagonal().mean().item() - 4096 / 64) < 1.0


def test_warm_start_recovers_a_subspace_that_has_not_moved():
    torch.manual_seed(4)
    U = torch.linalg.qr(torch.randn(2, 60, 8))[0]
    V = torch.linalg.qr(torch.randn(2, 40, 8))[0]
    G = U @ torch.diag_embed(torch.tensor([10.0, 8, 6, 5, 4, 3, 2, 1])) @ V.mT + 1e-3 * torch.randn(2, 60, 40)
    exact = proj.svd_bases(G, 4, True)
    warm = proj.warm_subspace(G, exact, 4, True, seed=0, iters=1)
    e_exact, e_warm = proj.captured_energy(G, exact, True), proj.captured_energy(G, warm, True)
    torch.testing.assert_close(e_warm, e_exact, rtol=1e-6, atol=0)


def test_rotation_is_exact_for_a_signed_permutation_of_the_basis():
    # A refresh whose new basis is the old one reordered with sign flips: with rotated
    # moments, training goes on exactly as if nothing had changed.
    model, X, Y = mlp(), *data()
    twin = copy.deepcopy(model)
    opts = [LowRankAdamW(lowrank_param_groups(m, targets=["0"], rank=4), lr=1e-2, projector="svd",
                         moments="rotate", update_gap=3) for m in (model, twin)]
    train(model, opts[0], 3, X, Y)
    train(twin, opts[1], 3, X, Y)
    w = twin[0].weight
    perm, signs = torch.tensor([2, 0, 3, 1]), torch.tensor([1.0, -1.0, -1.0, 1.0])
    for o, m in zip(opts, (model, twin)):
        o.state[m[0].weight]["next_refresh"] = 10**9  # no refresh from here on
    # The twin switches to the permuted basis, moments rotated by the optimiser's rule.
    st = opts[1].state[w]
    old = st["basis"].clone()
    new = (signs[:, None] * old[perm]).unsqueeze(0)
    C = proj.change_of_basis(new, old.unsqueeze(0))
    m_, v_ = proj.rotate_moments(st["exp_avg"][None], st["exp_avg_sq"][None], C, True)
    st["basis"], st["exp_avg"], st["exp_avg_sq"] = new[0], m_[0], v_[0]
    train(model, opts[0], 6, X, Y, start=3)
    train(twin, opts[1], 6, X, Y, start=3)
    torch.testing.assert_close(twin[0].weight, model[0].weight, rtol=1e-6, atol=1e-7)  # fp32 roundings


def test_rotation_keeps_the_first_moment_when_the_span_is_kept():
    torch.manual_seed(5)
    old = torch.linalg.qr(torch.randn(1, 30, 6))[0].mT  # [1, 6, 30] orthonormal rows
    O = torch.linalg.qr(torch.randn(1, 6, 6))[0]
    new = O @ old  # same span, rotated within it
    m, v = torch.randn(1, 12, 6), torch.rand(1, 12, 6)
    m2, v2 = proj.rotate_moments(m, v, proj.change_of_basis(new, old), True)
    torch.testing.assert_close(m2 @ new, m @ old, rtol=1e-5, atol=1e-6)  # the full-space moment
    assert (v2 >= 0).all()
    ml, vl = proj.rotate_moments(m.mT, v.mT, proj.change_of_basis(new, old), False)
    torch.testing.assert_close(new.mT @ ml, old.mT @ m.mT, rtol=1e-5, atol=1e-6)


def test_dct_rotation_reindexes_exactly():
    new, old = torch.tensor([[3, 1, 7]]), torch.tensor([[1, 5, 3]])
    C = proj.dct_change_of_basis(new, old)
    m, v = torch.randn(1, 4, 3), torch.rand(1, 4, 3)
    m2, v2 = proj.rotate_moments(m, v, C, True)
    assert torch.equal(m2[..., 0], m[..., 2]) and torch.equal(m2[..., 1], m[..., 0])
    assert torch.equal(v2[..., 0], v[..., 2]) and not m2[..., 2].any()  # index 7 is new: zero


def test_reset_zeroes_the_moments_at_a_refresh():
    model, (X, Y) = mlp(), data()
    opt = LowRankAdamW(lowrank_param_groups(model, targets=["0"], rank=4), moments="reset", update_gap=2)
    train(model, opt, 2, X, Y)
    st = opt.state[model[0].weight]
    before = st["exp_avg"].clone()
    opt.zero_grad()
    ((model(X) - Y) ** 2).mean().backward()
    g = model[0].weight.grad
    opt.step()  # step 3 refreshes first: the moments restart from this gradient alone
    R = g @ st["basis"].T
    torch.testing.assert_close(st["exp_avg"], 0.1 * R)
    assert not torch.allclose(st["exp_avg"], 0.9 * before + 0.1 * R)


def test_adaptive_gap_doubles_on_a_stable_subspace():
    # A fixed gradient direction: every refresh finds the same first vector (|cos| = 1),
    # so after 5 refreshes of gap 1 the gap doubles at each refresh: 2, 4, ...
    W = nn.Parameter(torch.zeros(12, 8))
    opt = QGaLoreAdamW([dict(params=[W], rank=2, update_gap=1)])
    G = torch.outer(torch.arange(1.0, 13), torch.arange(1.0, 9))
    refresh_steps = []
    for t in range(20):
        W.grad = G.clone()
        before = opt.state[W].get("refreshes", 0)
        opt.step()
        if opt.state[W]["refreshes"] > before:
            refresh_steps.append(t)
    assert refresh_steps == [0, 1, 2, 3, 4, 5, 7, 11, 19]


def test_int4_basis_is_at_most_a_seventh_of_float32():
    # 4 bits per entry plus a float32 (scale, minimum) per group of 256: 4.25 bits.
    W = nn.Parameter(torch.randn(300, 256))
    opt = QGaLoreAdamW([dict(params=[W], rank=4)])
    W.grad = torch.randn(300, 256)
    opt.step()
    st = opt.state[W]
    stored = sum(st[k].numel() * st[k].element_size() for k in ("basis", "basis_scale", "basis_zero"))
    assert st["basis"].dtype == torch.uint8
    assert stored * 7 <= 4 * 256 * 4  # float32 basis [r=4, k=256]


def test_stagger_spreads_the_refreshes():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 24), nn.Linear(24, 20), nn.Linear(20, 16))
    opt = LowRankAdamW(lowrank_param_groups(model, rank=2), update_gap=8, stagger=True)
    x = torch.randn(4, 16)
    for _ in range(17):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    # Four shape groups, phases 0, 2, 4, 6 of the gap 8: the first refreshes all at step 0,
    # then the others early by their phase, then every 8 steps.
    assert [opt.state[m.weight]["next_refresh"] for m in model] == [24, 18, 20, 22]


CONFIGS = {
    "rsvd-rotate": dict(projector="rsvd"),
    "svd-int4-adaptive": dict(projector="svd", proj_bits=4, adaptive_gap=True),
    "dct": dict(projector="dct"),
    "random-stagger": dict(projector="random", stagger=True),
}


@pytest.mark.parametrize("config", CONFIGS, ids=list(CONFIGS))
def test_resume_is_bit_identical_and_loads_weights_only(config):
    X, Y = data()
    model = mlp()
    make = lambda m: LowRankAdamW(lowrank_param_groups(m, targets=["0", "2"], rank=4), lr=1e-2,  # noqa: E731
                                  update_gap=2, weight_decay=0.01, **CONFIGS[config])
    straight = copy.deepcopy(model)
    train(straight, make(straight), 7, X, Y)
    opt = make(model)
    train(model, opt, 3, X, Y)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = mlp(seed=9)
    resumed.load_state_dict(saved["model"])
    opt2 = make(resumed)
    opt2.load_state_dict(saved["opt"])
    train(resumed, opt2, 7, X, Y, start=3)
    for a, b in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(a, b)


def test_bf16_weights_with_stochastic_rounding_resume_bit_identically():
    X, Y = data()
    model = mlp().to(torch.bfloat16)
    make = lambda m: LowRankAdamW(lowrank_param_groups(m, targets=["0"], rank=4), lr=1e-2,  # noqa: E731
                                  update_gap=2, stochastic_rounding=True)
    straight = copy.deepcopy(model)
    train(straight, make(straight), 5, X.bfloat16(), Y.bfloat16())
    opt = make(model)
    train(model, opt, 2, X.bfloat16(), Y.bfloat16())
    sd = copy.deepcopy(opt.state_dict())
    opt2 = make(model)
    opt2.load_state_dict(sd)
    assert opt2.state[model[0].weight]["exp_avg"].dtype == torch.float32  # not cast to bf16
    train(model, opt2, 5, X.bfloat16(), Y.bfloat16(), start=2)
    for a, b in zip(model.parameters(), straight.parameters()):
        assert torch.equal(a, b)


def test_works_with_an_lr_scheduler():
    model, (X, Y) = mlp(), data()
    opt = DCTAdamW(lowrank_param_groups(model, rank=4), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.0 if t >= 2 else 1.0)
    for _ in range(2):
        train(model, opt, 1, X, Y)
        sched.step()
    frozen = [p.clone() for p in model.parameters()]
    train(model, opt, 2, X, Y)  # lr 0: nothing moves
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.parameters()))


# ---------------------------------------------------------------------- bad input


def test_nonfinite_gradient_names_the_parameter_or_is_skipped():
    model, (X, Y) = mlp(), data()
    opt = LowRankAdamW(lowrank_param_groups(model, rank=4))
    train(model, opt, 1, X, Y)
    opt.zero_grad()
    ((model(X) - Y) ** 2).mean().backward()
    model[2].weight.grad[3, 1] = float("nan")
    assert_raises_naming(opt.step, ValueError, ["'2.weight'", "non-finite"])
    opt.skip_nonfinite = True
    before = [p.clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    after = opt.state_dict()["state"]
    assert all(torch.equal(after[i]["exp_avg"], state["state"][i]["exp_avg"]) for i in after)


@pytest.mark.parametrize(
    "make,exc,words",
    [
        (lambda m: LowRankAdamW(lowrank_param_groups(m, rank=17)), ValueError, ["'2.weight'", "rank", "16", "17"]),
        (lambda m: LowRankAdamW([dict(params=[m[0].bias], rank=2)]), ValueError, ["2-D", "[40]"]),
        (lambda m: LowRankAdamW(lowrank_param_groups(m, rank=2), projector="qr"), ValueError, ["projector", "'qr'"]),
        (lambda m: LowRankAdamW(lowrank_param_groups(m, rank=2, moments="spin")), ValueError,
         ["param_groups[0]['moments']", "'spin'"]),
        (lambda m: LowRankAdamW(lowrank_param_groups(m, rank=2), proj_bits=8), ValueError, ["proj_bits", "8"]),
        (lambda m: LowRankAdamW(lowrank_param_groups(m, rank=2), projector="dct", proj_bits=4), ValueError,
         ["proj_bits", "'dct'"]),
        (lambda m: LowRankAdamW(m.parameters(), lr=-1.0), ValueError, ["lr", "-1.0"]),
        (lambda m: LowRankAdamW(m.parameters(), rank=2.5), TypeError, ["rank", "float"]),
        (lambda m: lowrank_param_groups(m, targets=["nothing"]), ValueError, ["targets", "nothing"]),
    ],
    ids=["rank-too-big", "not-2d", "projector", "moments", "proj-bits", "int4-dct", "lr", "rank-type", "targets"],
)
def test_bad_construction_names_the_argument(make, exc, words):
    assert_raises_naming(lambda: make(mlp()), exc, words)


def test_mismatched_state_dict_raises_and_changes_nothing():
    X, Y = data()
    small, big = mlp(), mlp()
    o_small = LowRankAdamW(lowrank_param_groups(small, targets=["0"], rank=2))
    o_big = LowRankAdamW(lowrank_param_groups(big, targets=["0"], rank=2))
    train(small, o_small, 1, X, Y)
    train(big, o_big, 2, X, Y)
    sd = copy.deepcopy(o_big.state_dict())
    key = next(i for i, s in sd["state"].items() if "basis" in s)
    sd["state"][key]["exp_avg"] = torch.zeros(40, 3)
    before = copy.deepcopy(o_small.state_dict())
    assert_raises_naming(lambda: o_small.load_state_dict(sd), ValueError, ["'0.weight'", "exp_avg", "[40, 2]", "[40, 3]"])
    after = o_small.state_dict()
    assert all(torch.equal(after["state"][i]["exp_avg"], before["state"][i]["exp_avg"]) for i in after["state"])
    other = LowRankAdamW(lowrank_param_groups(mlp(), targets=["0"], rank=3))
    assert_raises_naming(lambda: other.load_state_dict(o_big.state_dict()), ValueError, ["rank", "3", "2"])


def test_a_group_added_later_is_trained_in_low_rank():
    model, (X, Y) = mlp(), data()
    opt = LowRankAdamW([dict(params=[model[4].weight, model[4].bias])], lr=1e-2)
    opt.add_param_group(dict(params=[model[0].weight], rank=3, update_gap=2))
    train(model, opt, 3, X, Y)
    st = opt.state[model[0].weight]
    assert st["exp_avg"].shape == (40, 3) and st["refreshes"] == 2
    assert model[2].weight not in opt.state  # not an optimiser parameter


def test_canonical_signs_fix_each_row_whatever_sign_it_came_with():
    torch.manual_seed(4)
    P = torch.linalg.qr(torch.randn(3, 20, 5))[0].mT  # [3, 5, 20] orthonormal rows
    C = proj.canonical_signs(P)
    rows = C.gather(-1, C.abs().argmax(-1, keepdim=True))
    assert (rows > 0).all()
    flips = torch.where(torch.rand(3, 5, 1) < 0.5, -1.0, 1.0)
    assert (flips < 0).any()
    assert torch.equal(proj.canonical_signs(P * flips), C)  # any sign in, the same basis out
    assert torch.equal(C.abs(), P.abs())


def test_rsvd_bases_have_canonical_signs_and_svd_keeps_lapacks():
    model = mlp()
    opt = LowRankAdamW(galore_groups(model), projector="rsvd", moments="keep")
    X, Y = data()
    train(model, opt, 4, X, Y)  # refreshes at steps 0 and 3 (cold, then warm)
    for w in (model[0].weight, model[2].weight):
        P = opt.state[w]["basis"]
        assert torch.equal(proj.canonical_signs(P), P)
    G = torch.randn(40, 24)
    svd = proj.bases_for("svd", G[None], 4, True, seed=0)[0]
    torch.testing.assert_close(svd, torch.linalg.svd(G, full_matrices=False)[2][:4])  # galore-torch's signs
