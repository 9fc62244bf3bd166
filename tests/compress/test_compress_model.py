"""compress_model: each method against its paper's definition on small float64
layers, the rank budgets, LowRankLinear, save/load and bad input."""
from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from svdkernels.calibration import collect_layer_stats
from svdkernels.compress import (
    LowRankLinear,
    Unit,
    allocate_global,
    allocate_uniform,
    compress_model,
    load_compressed,
    save_compressed,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# float64 models: the factors are then exact to ~1e-12, so the identities below are
# checked at tolerances that a wrong formula cannot meet.
RTOL = 1e-9


def _model(*shapes: tuple[int, int], seed: int = 0, bias: bool = True) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(shapes):
        layers.append(nn.Linear(n_in, n_out, bias=bias, dtype=torch.float64))
        if i < len(shapes) - 1:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def _batches(n_in: int, tokens: int, seed: int = 1, n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Channels of very different scales, as real activations have: the weighting matters.
    scale = torch.logspace(-1, 1, n_in, dtype=torch.float64)
    return [torch.randn(tokens, n_in, generator=g, dtype=torch.float64) * scale for _ in range(n)]


def _dense(layer: nn.Module) -> torch.Tensor:
    return layer.weight if isinstance(layer, nn.Linear) else layer.up @ layer.down


def _truncate(M: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


@pytest.mark.parametrize(("n_in", "n_out"), [(12, 8), (8, 12)], ids=["m<n", "m>n"])
def test_svd_llm_output_error_is_the_dropped_whitened_singular_values(n_in: int, n_out: int) -> None:
    model = _model((n_in, n_out))
    W = model[0].weight.detach().clone()
    batches = _batches(n_in, 40)
    compress_model(model, batches, method="svd_llm", keep=0.5, budget="uniform")
    layer = model[0]
    r = int(0.5 * n_in * n_out // (n_in + n_out))
    assert isinstance(layer, LowRankLinear) and layer.rank == r
    X = torch.cat(batches)
    S = torch.linalg.cholesky(X.T @ X)
    sigma = torch.linalg.svdvals(W @ S)
    err = ((W - _dense(layer).detach()) @ X.T).square().sum()
    torch.testing.assert_close(err, sigma[r:].square().sum(), rtol=RTOL, atol=0)
    # ... and it is the optimum: Eckart–Young on W·S, mapped back.
    torch.testing.assert_close(_dense(layer).detach(), _truncate(W @ S, r) @ torch.linalg.inv(S), rtol=1e-8,
                               atol=1e-10)


def test_svd_llm_singular_gram_is_shifted_then_refitted() -> None:
    # 6 calibration rows for 10 inputs: the Gram is singular, the m > n side needs its
    # Cholesky factor, hence the shift; the least-squares update of ``up`` then makes
    # the error on the data the optimum, the rank-r truncation of Y = W·Xᵀ.
    model = _model((10, 16))
    W = model[0].weight.detach().clone()
    X = _batches(10, 6, n=1)[0]
    compress_model(model, [X], method="svd_llm", keep=0.25, budget="uniform")
    r = model[0].rank
    err = ((W - _dense(model[0]).detach()) @ X.T).square().sum()
    best = torch.linalg.svdvals(W @ X.T)[r:].square().sum()
    assert best > 0
    torch.testing.assert_close(err, best, rtol=1e-6, atol=0)


def test_asvd_is_the_svd_of_the_activation_scaled_weight() -> None:
    model = _model((12, 9))
    W = model[0].weight.detach().clone()
    batches = _batches(12, 30)
    compress_model(model, batches, method="asvd", keep=0.6, budget="uniform", alpha=0.5)
    r = model[0].rank
    s = torch.cat(batches).abs().mean(0).pow(0.5)
    want = _truncate(W * s, r) / s
    torch.testing.assert_close(_dense(model[0]).detach(), want, rtol=1e-8, atol=1e-10)


def test_fwsvd_is_the_svd_of_the_fisher_row_weighted_weight() -> None:
    model = _model((10, 14), (14, 6))
    ref = copy.deepcopy(model)
    batches = _batches(10, 20)
    target = torch.randn(20, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def loss(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return (out - target).square().mean()

    compress_model(model, batches, method="fwsvd", keep=0.5, budget="uniform", loss=loss)
    # Row Fisher by hand: per batch, the squared gradient of each weight, summed over its row.
    fisher = [torch.zeros(14, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)]
    for x in batches:
        ref.zero_grad()
        loss(ref(x), x).backward()
        for f, i in zip(fisher, (0, 2)):
            f += ref[i].weight.grad.square().sum(1)
    for f, i in zip(fisher, (0, 2)):
        W = ref[i].weight.detach()
        r = model[i].rank
        w = f.sqrt()[:, None]
        torch.testing.assert_close(_dense(model[i]).detach(), _truncate(w * W, r) / w, rtol=1e-8, atol=1e-10)


def test_svd_is_eckart_young() -> None:
    model = _model((9, 13))
    W = model[0].weight.detach().clone()
    compress_model(model, method="svd", keep=0.4, budget="uniform")
    torch.testing.assert_close(_dense(model[0]).detach(), _truncate(W, model[0].rank), rtol=1e-8, atol=1e-10)


class _Blocks(nn.Module):
    """Two blocks of {query, out}: query layers share a basis under Basis Sharing."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            nn.ModuleDict({"query": nn.Linear(d, d, dtype=torch.float64), "out": nn.Linear(d, d, dtype=torch.float64)})
            for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.layer:
            x = x + blk["out"](torch.tanh(blk["query"](x)))
        return x


def test_basis_sharing_group_of_one_is_svd_llm() -> None:
    torch.manual_seed(0)
    a = _Blocks(10)
    b = copy.deepcopy(a)
    batches = _batches(10, 30)
    compress_model(a, batches, method="basis_sharing", keep=0.5, budget="uniform", group_size=1)
    compress_model(b, batches, method="svd_llm", keep=0.5, budget="uniform")
    for (na, ma), (nb, mb) in zip(a.named_modules(), b.named_modules()):
        if isinstance(ma, LowRankLinear):
            torch.testing.assert_close(_dense(ma), _dense(mb), rtol=1e-8, atol=1e-10)


def test_basis_sharing_shares_the_whitened_basis_and_refits_each_layer() -> None:
    torch.manual_seed(0)
    model = _Blocks(10)
    ref = copy.deepcopy(model)
    batches = _batches(10, 30)
    stats = collect_layer_stats(ref, {f"layer.{i}.query": ref.layer[i]["query"] for i in range(2)}, batches,
                                gram=True)
    compress_model(model, batches, method="basis_sharing", keep=0.5, budget="uniform", group_size=2,
                   shared=["query"])
    q0, q1 = model.layer[0]["query"], model.layer[1]["query"]
    assert q0.down is q1.down
    # rank from r·(n + 2m) <= keep·2·m·n
    assert q0.rank == int(0.5 * 2 * 100 // 30)
    assert isinstance(model.layer[0]["out"], LowRankLinear) and model.layer[0]["out"].down is not q0.down
    # The definition: S = chol of the summed Gram (each scaled to unit mean diagonal),
    # SVD of [W₁; W₂]·S, shared down = V_rᵀ·S⁻¹ (any basis of it), each up = the
    # least-squares fit W_i·G_i·downᵀ·(down·G_i·downᵀ)⁻¹ on its own inputs.
    Ws = [ref.layer[i]["query"].weight.detach() for i in range(2)]
    Gs = [stats[f"layer.{i}.query"].gram for i in range(2)]
    Gs = [G / G.diagonal().mean() for G in Gs]
    S = torch.linalg.cholesky((Gs[0] + Gs[1]) / 2)
    _, _, Vh = torch.linalg.svd(torch.cat(Ws) @ S)
    D = Vh[:q0.rank] @ torch.linalg.inv(S)
    for W, G, layer in zip(Ws, Gs, (q0, q1)):
        want = W @ G @ D.T @ torch.linalg.solve(D @ G @ D.T, D)
        torch.testing.assert_close(_dense(layer).detach(), want, rtol=1e-7, atol=1e-9)


def _objective(units: list[Unit], ranks: list) -> float:
    total = 0.0
    for u, r in zip(units, ranks):
        if r is not None:
            total += float(u.weight * u.lam[r:].sum() / u.lam.sum())
    return total


def _params(units: list[Unit], ranks: list) -> int:
    return sum(u.dense if r is None else r * u.per_rank for u, r in zip(units, ranks))


def test_global_budget_is_optimal_on_small_cases_and_beats_uniform() -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        units = []
        for i in range(3):
            m, n = [int(v) for v in torch.randint(4, 9, (2,), generator=g)]
            decay = float(torch.rand((), generator=g)) * 3
            lam = torch.arange(1, min(m, n) + 1, dtype=torch.float64).pow(-decay) * float(torch.rand((), generator=g))
            units.append(Unit([f"l{i}"], m + n, m * n, min(m, n), lam, weight=float(torch.rand((), generator=g)) + 0.1))
        for keep in (0.5, 0.7, 0.9):
            budget = int(keep * sum(u.dense for u in units))
            glob = allocate_global(units, keep)
            assert _params(units, glob) <= budget
            uni = allocate_uniform(units, keep)
            assert _params(units, uni) <= budget
            assert _objective(units, glob) <= _objective(units, uni) + 1e-12
            # Brute force over every rank (and dense) per unit.
            options = [[*range(1, u.max_rank + 1), None] for u in units]
            best = min(_objective(units, list(c)) for c in itertools.product(*options)
                       if _params(units, list(c)) <= budget)
            # Greedy is exact up to the last step that no longer fits: within one step's gain.
            slack = max(float(u.weight * u.lam[0] / u.lam.sum()) for u in units)
            assert _objective(units, glob) <= best + slack


def test_global_budget_beats_uniform_on_a_model() -> None:
    # One layer nearly rank 2, one not: the global budget moves rank to the second.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16, dtype=torch.float64), nn.Tanh(), nn.Linear(16, 16, dtype=torch.float64))
    with torch.no_grad():
        U, _, Vh = torch.linalg.svd(torch.randn(16, 16, dtype=torch.float64))
        s = torch.full((16,), 1e-3, dtype=torch.float64)
        s[:2] = 1
        model[0].weight.copy_((U * s) @ Vh)
    batches = _batches(16, 40)
    out = {}
    for budget in ("uniform", "global"):
        m = copy.deepcopy(model)
        compress_model(m, batches, method="svd_llm", keep=0.5, budget=budget)
        with torch.no_grad():
            out[budget] = sum(float((m(x) - model(x)).square().sum()) for x in batches)
    ranks = [m[i].rank if isinstance(m[i], LowRankLinear) else "dense" for i in (0, 2)]
    assert ranks[0] < ranks[1], ranks
    assert out["global"] < out["uniform"], out


def test_keep_one_changes_nothing_and_params_fit_the_budget() -> None:
    model = _model((12, 20), (20, 12))
    before = copy.deepcopy(model)
    assert compress_model(model, _batches(12, 30), keep=1.0) is model
    assert all(isinstance(m, nn.Linear) for m in (model[0], model[2]))
    assert torch.equal(model[0].weight, before[0].weight)
    for budget in ("global", "uniform"):
        m = compress_model(copy.deepcopy(before), _batches(12, 30), keep=0.6, budget=budget)
        kept = sum(p.numel() for n, p in m.named_parameters() if not n.endswith("bias"))
        assert kept <= 0.6 * (12 * 20 * 2), (budget, kept)


def test_low_rank_linear_forward_and_to_dense() -> None:
    g = torch.Generator().manual_seed(0)
    up, down, bias = (torch.randn(s, generator=g) for s in ((7, 3), (3, 5), (7,)))
    layer = LowRankLinear(up, down, bias)
    x = torch.randn(4, 2, 5, generator=g)
    torch.testing.assert_close(layer(x), (x @ down.T) @ up.T + bias)
    dense = layer.to_dense()
    assert isinstance(dense, nn.Linear) and dense.weight.shape == (7, 5)
    torch.testing.assert_close(dense(x), layer(x), rtol=1e-5, atol=1e-6)  # float32 reassociation
    with pytest.raises(ValueError, match="up, down"):
        LowRankLinear(up, torch.randn(4, 5))
    with pytest.raises(ValueError, match="bias"):
        LowRankLinear(up, down, torch.randn(6))


def test_save_load_bit_identical_with_shared_basis(tmp_path) -> None:
    torch.manual_seed(0)
    base = _Blocks(10).float()
    batches = [b.float() for b in _batches(10, 30)]
    model = compress_model(copy.deepcopy(base), batches, method="basis_sharing", keep=0.5, budget="global",
                           shared=["query"])
    path = tmp_path / "c.safetensors"
    save_compressed(model, path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert "layer.0.query.down" in keys and "layer.1.query.down" not in keys  # shared: stored once
    loaded = load_compressed(copy.deepcopy(base), path)
    assert loaded.layer[0]["query"].down is loaded.layer[1]["query"].down
    for (n, a), (_, b) in zip(model.named_modules(), loaded.named_modules()):
        assert type(a) is type(b), n
        if isinstance(a, LowRankLinear):
            assert torch.equal(a.up, b.up) and torch.equal(a.down, b.down) and torch.equal(a.bias, b.bias)
    x = torch.randn(3, 10)
    assert torch.equal(model(x), loaded(x))
    with pytest.raises(ValueError, match="no .*|LowRankLinear"):
        save_compressed(base, tmp_path / "none.safetensors")
    with pytest.raises(ValueError, match="model: layer"):
        load_compressed(_Blocks(12), path)


@pytest.mark.parametrize("keep", [0, -0.1, 1.5, math.nan])
def test_keep_outside_unit_interval(keep: float) -> None:
    with pytest.raises(ValueError, match="keep"):
        compress_model(_model((8, 8)), _batches(8, 20), keep=keep)


def test_bad_arguments_name_themselves() -> None:
    batches = _batches(8, 20)
    with pytest.raises(TypeError, match="keep"):
        compress_model(_model((8, 8)), batches, keep=True)
    with pytest.raises(ValueError, match="method"):
        compress_model(_model((8, 8)), batches, method="pca")
    with pytest.raises(ValueError, match="budget"):
        compress_model(_model((8, 8)), batches, budget="local")
    with pytest.raises(ValueError, match="calib_batches.*svd_llm"):
        compress_model(_model((8, 8)), None, method="svd_llm")
    with pytest.raises(TypeError, match="alpha.*svd_llm"):
        compress_model(_model((8, 8)), batches, method="svd_llm", alpha=0.5)
    with pytest.raises(ValueError, match="targets"):
        compress_model(_model((8, 8)), batches, targets=["nothing"])
    # The 3x8 layer at keep 0.3 would get rank ⌊0.3·24/11⌋ = 0.
    with pytest.raises(ValueError, match=r"keep.*'0'"):
        compress_model(_model((8, 3), (3, 1)), batches, keep=0.3, budget="uniform")
    with pytest.raises(ValueError, match="keep"):
        compress_model(_model((8, 3), (3, 1)), batches, keep=0.3, budget="global")


def test_non_finite_weights_rejected_before_anything_changes() -> None:
    model = _model((8, 8), (8, 8))
    with torch.no_grad():
        model[2].weight[1, 1] = math.inf
    with pytest.raises(ValueError, match=r"2\.weight"):
        compress_model(model, _batches(8, 20), method="svd_llm", keep=0.5)
    assert isinstance(model[0], nn.Linear) and isinstance(model[2], nn.Linear)


def test_non_finite_inputs_name_the_layer() -> None:
    model = _model((8, 8), (8, 8))
    bad = _batches(8, 20)
    bad[1][3, 2] = math.nan
    with pytest.raises(ValueError, match=r"calib_batches.*'0'"):
        compress_model(model, bad, method="svd_llm", keep=0.5, budget="uniform")
    assert isinstance(model[0], nn.Linear)


def test_layer_stats_one_pass_and_shared_inputs() -> None:
    class QKV(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k = nn.Linear(6, 4, dtype=torch.float64), nn.Linear(6, 4, dtype=torch.float64)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.q(x) * self.k(x)

    model = QKV()
    batches = _batches(6, 10)
    stats = collect_layer_stats(model, {"q": model.q, "k": model.k}, batches, gram=True, abs_mean=True,
                                fisher=True, sensitivity=True)
    assert model.calls == len(batches)  # one pass, backward included
    X = torch.cat(batches)
    for name in ("q", "k"):
        torch.testing.assert_close(stats[name].gram, X.T @ X, rtol=1e-12, atol=0)
        torch.testing.assert_close(stats[name].abs_mean, X.abs().mean(0), rtol=1e-12, atol=0)
        assert stats[name].fisher.shape == (4,) and bool((stats[name].fisher > 0).all())
        assert stats[name].out_grad_sq > 0 and stats[name].out_sq > 0
    assert stats["q"].gram is not stats["k"].gram  # shared product, separate accumulators
    assert not model.q.weight.grad_fn and model.q.weight.grad is None


def test_layer_kind_and_basis_sharing_groups() -> None:
    from svdkernels.compress import layer_kind

    assert layer_kind("encoder.layer.3.attention.self.query") == "encoder.layer.*.attention.self.query"
    assert layer_kind("h.10.mlp.c_fc") == "h.*.mlp.c_fc" and layer_kind("0") == "*"

    class Four(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.ModuleList(nn.ModuleDict({"query": nn.Linear(8, 8, dtype=torch.float64)})
                                       for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for blk in self.layer:
                x = torch.tanh(blk["query"](x))
            return x

    model = Four()
    compress_model(model, _batches(8, 30), method="basis_sharing", keep=0.5, budget="uniform", shared="layer.*query")
    q = [model.layer[i]["query"] for i in range(3)]
    # Consecutive groups of 2: layers 0 and 1 share, layer 2 (left over) is SVD-LLM alone.
    assert q[0].down is q[1].down and q[2].down is not q[0].down
    with pytest.raises(TypeError, match="shared"):
        compress_model(Four(), _batches(8, 30), method="basis_sharing", shared=[1, 2])


def test_fwsvd_default_loss_reaches_every_output_of_a_tuple() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(6, 6, dtype=torch.float64), nn.Linear(6, 6, dtype=torch.float64)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.a(x), self.b(x)  # no loss: the probe covers both outputs

    model = compress_model(Two(), _batches(6, 20), method="fwsvd", keep=0.5, budget="uniform")
    assert isinstance(model.a, LowRankLinear) and isinstance(model.b, LowRankLinear)


def test_asvd_global_budget_keeps_the_asvd_truncation() -> None:
    # Under the global budget ASVD allocates by the output error each of its directions
    # carries; the truncation itself stays ASVD's.
    model = _model((12, 9), (9, 12))
    batches = _batches(12, 40)
    g = compress_model(copy.deepcopy(model), batches, method="asvd", keep=0.6, budget="global")
    X = torch.cat(batches)
    for i in (0, 2):
        layer = g[i]
        if not isinstance(layer, LowRankLinear):
            continue
        W = model[i].weight.detach()
        inputs = X if i == 0 else torch.tanh(model[0](X)).detach()
        s = inputs.abs().mean(0).pow(0.5)
        torch.testing.assert_close(_dense(layer).detach(), _truncate(W * s, layer.rank) / s, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(("n_in", "n_out"), [(12, 8), (8, 12)], ids=["m<n", "m>n"])
def test_output_errors_of_asvd_directions(n_in: int, n_out: int) -> None:
    from svdkernels.compress.factor import left_spectrum
    from svdkernels.compress.model import _output_errors

    model = _model((n_in, n_out))
    batches = _batches(n_in, 30)
    stats = collect_layer_stats(model, {"0": model[0]}, batches, gram=n_out >= n_in, out_gram=n_out < n_in)
    W = model[0].weight.detach()[None]
    p = torch.rand(1, n_in, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.1
    spec = left_spectrum(W, p=p)
    e = _output_errors(W, spec, stats, ["0"], W.device)[0]
    Y = torch.cat(batches) @ W[0].T
    # Dropping directions i >= r leaves exactly Σ_{i>=r} e_i of output error.
    for r in (1, 3, min(n_in, n_out)):
        U = spec.basis[0, :, :r]
        err = (Y - Y @ U @ U.T).square().sum()
        torch.testing.assert_close(err, e[r:].sum(), rtol=1e-9, atol=1e-9 * float(Y.square().sum()))
