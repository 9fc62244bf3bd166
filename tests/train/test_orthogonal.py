"""OrthogonalSubspace (Sculpting Subspaces / OSF): projection, frozen directions across
tasks, the importance rule, optimiser guard, state files and bad input."""
import pytest
import torch
from torch import nn

from svdkernels.testing.errors import assert_raises_naming
from svdkernels.train.optim import LowRankAdamW, lowrank_param_groups
from svdkernels.train.orthogonal import OrthogonalSubspace, project_off

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 40), nn.GELU(), nn.Linear(40, 24))


def batches(seed, n=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 24, generator=g) for _ in range(n)]


def train(model, opt, X, steps=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    Y = torch.randn(X.shape[0], 24, generator=g)
    for _ in range(steps):
        opt.zero_grad()
        ((model(X) - Y) ** 2).mean().backward()
        opt.step()


def test_project_off_matches_dense_projectors_and_is_idempotent():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(30, 20, dtype=torch.float64, generator=g)
    U = torch.linalg.qr(torch.randn(30, 4, dtype=torch.float64, generator=g)).Q
    V = torch.linalg.qr(torch.randn(20, 3, dtype=torch.float64, generator=g)).Q
    dense = (torch.eye(30, dtype=torch.float64) - U @ U.T) @ G @ (torch.eye(20, dtype=torch.float64) - V @ V.T)
    formula = G - U @ (U.T @ G) - (G @ V) @ V.T + U @ (U.T @ G @ V) @ V.T
    out = project_off(G.clone(), U, V)
    torch.testing.assert_close(out, dense)
    torch.testing.assert_close(out, formula)
    torch.testing.assert_close(project_off(out.clone(), U, V), out)


def test_frozen_directions_unchanged_by_sgd_and_accumulate_across_tasks():
    model = mlp()
    osf = OrthogonalSubspace(model, rank_fraction=0.25, importance="uniform")
    X = batches(1, 1)[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    osf.begin_task()  # task 1: nothing frozen yet
    assert set(osf.frozen_rank().values()) == {0}
    train(model, opt, X)
    osf.end_task()
    osf.begin_task()
    k1 = osf.frozen_rank()
    assert k1 == {"0": 6, "2": 10, "4": 6}  # round(0.25 * min(m, n))
    w = model[2].weight
    U, V = osf.U["2"].clone(), osf.V["2"].clone()
    # The frozen directions are the top singular directions of the weight at the task start.
    Us, _, Vh = torch.linalg.svd(w.detach())
    torch.testing.assert_close((U.T @ Us[:, :10]).abs().diag(), torch.ones(10), atol=1e-4, rtol=0)
    before_A, before_B = U.T @ w.detach(), w.detach() @ V
    w0 = w.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train(model, opt, X, seed=5)
    assert (w.detach() - w0).norm() > 1e-2  # the weight did train
    torch.testing.assert_close(U.T @ w.detach(), before_A, atol=1e-5, rtol=0)
    torch.testing.assert_close(w.detach() @ V, before_B, atol=1e-5, rtol=0)
    osf.end_task()
    osf.begin_task()
    k2 = osf.frozen_rank()
    assert k2 == {n: 2 * k for n, k in k1.items()}
    # Old directions are kept, the new ones orthogonal to them.
    torch.testing.assert_close(osf.U["2"][:, :10], U)
    torch.testing.assert_close(osf.U["2"].T @ osf.U["2"], torch.eye(20), atol=1e-5, rtol=0)
    torch.testing.assert_close(osf.V["2"].T @ osf.V["2"], torch.eye(20), atol=1e-5, rtol=0)
    osf.end_task()


def test_guard_keeps_frozen_components_exact_for_adam_and_lowrank_adamw():
    for make in (lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
                 lambda m: LowRankAdamW(lowrank_param_groups(m, r"[0-9]", rank=4, update_gap=2), lr=1e-2)):
        model = mlp(1)
        osf = OrthogonalSubspace(model, rank_fraction=0.3, importance="uniform")
        osf.begin_task()
        osf.end_task()
        opt = make(model)
        osf.begin_task(optimizer=opt)
        w = model[0].weight
        U, V = osf.U["0"], osf.V["0"]
        A0, B0 = U.T @ w.detach(), w.detach() @ V
        w0 = w.detach().clone()
        train(model, opt, batches(2, 1)[0])
        assert (w.detach() - w0).norm() > 1e-2
        torch.testing.assert_close(U.T @ w.detach(), A0, atol=1e-5, rtol=0)
        torch.testing.assert_close(w.detach() @ V, B0, atol=1e-5, rtol=0)
        osf.end_task()


def test_without_guard_adam_moves_frozen_directions():
    # Why the guard exists: elementwise Adam steps leave the projected subspace.
    model = mlp(1)
    osf = OrthogonalSubspace(model, rank_fraction=0.3, importance="uniform")
    osf.begin_task()
    osf.end_task()
    osf.begin_task()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    w, U = model[0].weight, osf.U["0"]
    A0 = U.T @ w.detach()
    train(model, opt, batches(2, 1)[0])
    assert (U.T @ w.detach() - A0).abs().max() > 1e-3
    osf.end_task()


def test_io_similarity_rule_sets_rank_per_layer():
    model = mlp(2)
    osf = OrthogonalSubspace(model, rank_fraction=0.25, importance="io_similarity", min_fraction=0.05)
    osf.begin_task()
    osf.end_task()
    osf.begin_task(batches(3))
    f = osf.last_fractions
    # Mean fraction is rank_fraction (before rounding); each layer gets its own.
    assert abs(sum(f.values()) / 3 - 0.25) < 1e-9
    assert len({round(v, 6) for v in f.values()}) > 1
    # Layer 2 (square) uses its own io cosine; layers 0 and 4 (non-square) the whole model's.
    with torch.no_grad():
        X = torch.cat(batches(3))
        h = torch.nn.functional.gelu(model[0](X))
        s2 = torch.nn.functional.cosine_similarity(h, model[2](h), dim=-1).mean()
        s_all = torch.nn.functional.cosine_similarity(X, model(X), dim=-1).mean()
    imp = torch.tensor([1 - s_all, 1 - s2, 1 - s_all])
    want = 0.05 + imp / imp.mean() * (0.25 - 0.05)
    torch.testing.assert_close(torch.tensor([f["0"], f["2"], f["4"]], dtype=torch.float32), want.float(),
                               atol=1e-4, rtol=0)
    osf.end_task()


def test_state_round_trip_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    model = mlp()
    osf = OrthogonalSubspace(model, rank_fraction=0.2, importance="uniform")
    osf.begin_task()
    osf.end_task()
    osf.begin_task()
    save_file(osf.state_dict(), str(tmp_path / "osf.safetensors"))
    other = OrthogonalSubspace(mlp(), rank_fraction=0.2, importance="uniform")
    other.load_state_dict(load_file(str(tmp_path / "osf.safetensors")))
    for n in osf.U:
        assert torch.equal(other.U[n], osf.U[n]) and torch.equal(other.V[n], osf.V[n])
    bad = osf.state_dict()
    bad["2.U"] = bad["2.U"][:5]
    assert_raises_naming(lambda: other.load_state_dict(bad), ValueError, ["state", "2.U"])
    osf.end_task()


def test_bad_input():
    model = mlp()
    assert_raises_naming(lambda: OrthogonalSubspace(model, rank_fraction=1.5), ValueError, ["rank_fraction", "1.5"])
    assert_raises_naming(lambda: OrthogonalSubspace(model, rank_fraction=0), ValueError, ["rank_fraction"])
    assert_raises_naming(lambda: OrthogonalSubspace(model, importance="fisher"), ValueError,
                         ["importance", "io_similarity", "fisher"])
    assert_raises_naming(lambda: OrthogonalSubspace("model"), TypeError, ["model", "str"])
    assert_raises_naming(lambda: OrthogonalSubspace(model, targets="nothing"), ValueError, ["targets", "nothing"])
    osf = OrthogonalSubspace(model)
    assert_raises_naming(osf.end_task, ValueError, ["end_task", "begin_task"])
    osf.begin_task()  # the first task freezes nothing: no calibration needed
    assert_raises_naming(osf.begin_task, ValueError, ["begin_task", "end_task"])
    osf.end_task()
    assert_raises_naming(osf.begin_task, ValueError, ["calib_batches", "io_similarity", "None"])
    assert_raises_naming(lambda: osf.begin_task([]), ValueError, ["calib_batches", "at least one batch"])
    osf2 = OrthogonalSubspace(mlp(), importance="uniform")
    assert_raises_naming(lambda: osf2.begin_task(optimizer=object()), TypeError, ["optimizer", "object"])
