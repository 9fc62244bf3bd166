"""svdkernels.adapt and SVDLinear: parametrisations, outputs at init, trainable sets,
thin forward, merge, save/load, regularisers, AdaLoRA budget and bad input."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import svdkernels
from svdkernels.adapters import (
    ALL_METHODS,
    AdaLoRABudget,
    KronLinear,
    SVDLinear,
    adapt,
    adapter_layers,
    load_adapter,
    mark_only_adapter_trainable,
    regularization_loss,
    save_adapter,
)
from svdkernels.adapters import methods as methods_mod
from svdkernels.adapters.methods import METHODS, damped_inverse
from svdkernels.testing.errors import assert_raises_naming
from svdkernels.testing.adapters import calib_batches, inputs, perturb, toy_model

CALIB = ("corda", "eva")
SVD_METHODS = tuple(METHODS)
# Declared trainable names per method (what the papers train).
TRAINABLE = {
    "lora": {"lora_A", "lora_B"}, "pissa": {"lora_A", "lora_B"}, "milora": {"lora_A", "lora_B"},
    "soma": {"lora_A", "lora_B"},
    "corda": {"lora_A", "lora_B"}, "eva": {"lora_A", "lora_B"}, "svfit": {"lora_E"}, "clip_svd": {"lora_E"},
    "sorsa": {"lora_A", "lora_E", "lora_B"}, "effort": {"lora_A", "lora_E", "lora_B"},
    "kasa": {"lora_A", "lora_E", "lora_B"}, "adalora": {"lora_A", "lora_E", "lora_B"},
    "nlora": {"lora_A", "lora_N", "lora_B"}, "salt": {"salt_scale", "salt_shift", "salt_X", "salt_Y"},
    "soka": {"A", "B"},
}


def adapted(method: str, rank: int = 16, **kw) -> nn.Module:
    model = toy_model(kw.pop("dtype", torch.float32))
    return adapt(model, method, rank=rank, calib_batches=calib_batches() if method in CALIB else None, **kw)


@pytest.mark.parametrize("method", [m for m in ALL_METHODS if m != "kasa"])
def test_outputs_unchanged_at_init(method):
    x = inputs()
    y0 = toy_model()(x)
    y = adapted(method)(x)
    # fp32 factorisations round trip to ~1e-6 relative (NLoRA's pinv of a 16x16 block is a few times worse).
    torch.testing.assert_close(y, y0, rtol=2e-5, atol=2e-5)


def test_kasa_drops_the_minor_components():
    model = adapted("kasa")
    base = toy_model()
    for name, layer in adapter_layers(model).items():
        W = base.get_submodule(name).weight.detach()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        k = S.numel() - 16
        torch.testing.assert_close(layer.weight, (U[:, :k] * S[:k]) @ Vh[:k], rtol=1e-4, atol=1e-5)
        assert torch.count_nonzero(layer.lora_B) == 0 and torch.equal(layer.lora_E, torch.ones(16))


def _exact_svd(name: str):
    W = toy_model().get_submodule(name).weight.detach()
    return W, *torch.linalg.svd(W, full_matrices=False)


@pytest.mark.parametrize("method", ["pissa", "milora"])
def test_pissa_milora_factors_are_the_principal_or_minor_components(method):
    model = adapted(method, rank=8, alpha=4.0)
    for name, layer in adapter_layers(model).items():
        W, U, S, Vh = _exact_svd(name)
        assert layer.scaling == 0.5
        BA = layer.scaling * layer.lora_B @ layer.lora_A
        if method == "pissa":  # rsvd: the rank-8 error is within 1% of Eckart-Young's optimum
            err = torch.linalg.matrix_norm((W - BA).double())
            assert err <= 1.01 * S[8:].double().pow(2).sum().sqrt(), name
        else:  # exact SVD of the tail
            target = (U[:, -8:] * S[-8:]) @ Vh[-8:]
            torch.testing.assert_close(BA, target, rtol=1e-3, atol=1e-5)
        # The split is balanced: A Aᵀ = Bᵀ B = diag(S/s).
        torch.testing.assert_close(layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B, rtol=1e-3,
                                   atol=1e-4)


@pytest.mark.parametrize("method", ["svfit", "sorsa", "clip_svd", "effort"])
def test_spectral_methods_hold_singular_values(method):
    model = adapted(method, rank=8)
    for name, layer in adapter_layers(model).items():
        _, _, S, _ = _exact_svd(name)
        expected = {"svfit": S[:8], "sorsa": S[:8], "clip_svd": S, "effort": S[-8:]}[method]
        torch.testing.assert_close(layer.lora_E, expected, rtol=1e-4, atol=1e-5)
        r = layer.rank
        torch.testing.assert_close(layer.lora_A @ layer.lora_A.T, torch.eye(r), atol=1e-4, rtol=0)
        assert (layer.weight is None) == (method == "clip_svd")


def test_corda_modes_follow_the_covariance():
    calib = calib_batches()
    C = torch.cat(calib).double()
    C = C.T @ C / C.shape[0]
    Cd, Cinv = damped_inverse(C[None])
    assert torch.dist(Cd[0] @ Cinv[0], torch.eye(64, dtype=torch.float64)) < 0.05
    W = toy_model()[0].weight.detach().double()
    U, S, Vh = torch.linalg.svd(W @ Cd[0], full_matrices=False)
    for mode, sl in (("ipm", slice(0, 8)), ("kpm", slice(56, 64))):
        model = adapt(toy_model(), "corda", rank=8, targets=["0"], calib_batches=calib, corda_mode=mode)
        layer = model[0]
        target = (U[:, sl] * S[sl]) @ (Vh[sl] @ Cinv[0])
        torch.testing.assert_close(layer.lora_B.double() @ layer.lora_A.double(), target, rtol=1e-3, atol=1e-4)


def test_eva_ranks_are_redistributed_within_the_budget():
    model = adapted("eva", rank=8)
    layers = adapter_layers(model)
    ranks = {n: m.rank for n, m in layers.items()}
    assert sum(ranks.values()) <= 8 * 4 and max(ranks.values()) <= 16
    assert len(set(ranks.values())) > 1  # redistributed, not uniform
    for layer in layers.values():
        torch.testing.assert_close(layer.lora_A @ layer.lora_A.T, torch.eye(layer.rank), atol=1e-4, rtol=0)
        assert torch.count_nonzero(layer.lora_B) == 0
        assert layer.scaling == 1.0  # alpha / initial rank, for every layer


def test_nlora_is_the_nystrom_approximation():
    model = adapted("nlora", rank=16)
    for name, layer in adapter_layers(model).items():
        W = toy_model().get_submodule(name).weight.detach().double()
        nys = W[:, :16] @ torch.linalg.pinv(W[:16, :16]) @ W[:16]
        torch.testing.assert_close(layer.delta_weight().double(), nys, rtol=1e-3, atol=1e-3)
    frozen = adapted("nlora", train_core_only=True)
    assert {n.split(".")[-1] for n, p in frozen.named_parameters() if p.requires_grad} == {"lora_N"}


@pytest.mark.parametrize("method", ALL_METHODS)
def test_only_declared_parameters_train(method):
    model = mark_only_adapter_trainable(adapted(method))
    trainable = {n.split(".")[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == TRAINABLE[method]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = model(inputs()).pow(2).mean() + regularization_loss(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (n.split(".")[-1] in TRAINABLE[method]) or not p.requires_grad and not changed, n


class _LargestAllocation(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Outputs sharing an input's storage (views such as weight.t()) allocate nothing.
        inputs_storage = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs_storage:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("method", SVD_METHODS)
def test_forward_and_backward_never_build_a_dense_weight(method):
    model = adapted(method)
    x = torch.randn(3, 64)
    with _LargestAllocation() as probe:
        model(x).sum().backward()
    # Tensors created: activations [3, ≤96], factor-sized gradients (≤ 96x16) and SALT's thin
    # U_rest·X, Y·V_restᵀ (≤ 96x16). A dense ΔW or rebuilt weight would be ≥ 64x64 = 4096 entries.
    assert probe.largest < 64 * 64, probe.largest


@pytest.mark.parametrize("method", SVD_METHODS)
def test_merge_unmerge(method):
    model = adapted(method)
    perturb(model)
    x = inputs()
    y = model(x)
    weights = {n: (m.weight.detach().clone() if m.weight is not None else None)
               for n, m in adapter_layers(model).items()}
    # fp32 rounding of W + ΔW: relative to the larger of the two (NLoRA's Nyström factors are large
    # and cancel against its residual).
    size = max(float(m.delta_weight().detach().abs().max()) + (0 if m.weight is None else float(m.weight.abs().max()))
               for m in adapter_layers(model).values())
    for m in adapter_layers(model).values():
        m.merge()
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5 * max(1.0, size))
    for n, m in adapter_layers(model).items():
        m.unmerge()
        if weights[n] is None:
            assert m.weight is None
        else:
            torch.testing.assert_close(m.weight, weights[n], rtol=1e-6, atol=1e-6 * max(1.0, size))
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5 * max(1.0, size))


@pytest.mark.parametrize("method", SVD_METHODS)
def test_save_load_is_bit_identical(method, tmp_path):
    model = adapted(method)
    perturb(model)
    if method == "adalora":
        adapter_layers(model)["0"].rank_mask[:3] = False
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    loaded = load_adapter(toy_model(), path)
    x = inputs()
    assert torch.equal(loaded(x), model(x))
    for (n, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters()):
        assert a.requires_grad == b.requires_grad, n


def test_save_load_errors(tmp_path):
    with pytest.raises(ValueError, match="found none"):
        save_adapter(toy_model(), tmp_path / "x.safetensors")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"format": "x"})
    assert_raises_naming(lambda: load_adapter(toy_model(), tmp_path / "other.safetensors"), ValueError,
                         ["path", "svdkernels.svd_adapter", "'x'"])
    model = adapted("pissa")
    save_adapter(model, tmp_path / "a.safetensors")
    wrong = nn.Sequential(nn.Linear(64, 32))
    with pytest.raises(ValueError, match="model"):
        load_adapter(wrong, tmp_path / "a.safetensors")


def test_batched_initialisation_one_rsvd_call_per_shape_group(monkeypatch):
    calls = []
    real = methods_mod.rsvd

    def counting(W, rank, **kw):
        calls.append(tuple(W.shape))
        return real(W, rank, **kw)

    monkeypatch.setattr(methods_mod, "rsvd", counting)
    adapted("pissa")
    assert sorted(calls) == sorted([(1, 96, 64), (1, 64, 96), (2, 64, 64)])


def test_regularizers():
    for method in ("sorsa", "effort"):  # orthonormal factors at init: the regulariser is ~0
        assert regularization_loss(adapted(method)).item() < 1e-4
    assert regularization_loss(adapted("pissa")).item() == 0.0
    for method in ("sorsa", "effort", "kasa", "adalora", "salt"):
        model = adapted(method)
        perturb(model, size=0.2)
        reg = regularization_loss(model)
        assert reg.item() > 0 and reg.requires_grad, method


def test_salt_regulariser_matches_its_definition():
    model = adapted("salt", reg_weight=1.0)
    perturb(model, size=0.2)
    layer = model[0]
    XY = layer.salt_X @ layer.salt_Y
    expected = torch.linalg.vector_norm(torch.relu(layer.salt_scale * layer.sigma + layer.salt_shift) - layer.sigma)
    expected = expected + torch.linalg.matrix_norm(XY)
    torch.testing.assert_close(methods_mod.layer_regularizer(layer), expected, rtol=1e-4, atol=1e-6)


def test_adalora_budget_schedule_and_masking():
    model = mark_only_adapter_trainable(adapted("adalora", rank=12))
    budget = AdaLoRABudget(model, target_rank=4, total_steps=20, tinit=2, tfinal=4)
    assert budget.budget(1) == (48, False)
    assert budget.budget(17) == (16, True)
    b_mid, _ = budget.budget(8)
    assert 16 < b_mid < 48
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, 21):
        model(inputs()).pow(2).mean().backward()
        opt.step()
        budget.step(step)
        opt.zero_grad()
    assert sum(budget.ranks().values()) == 16
    for layer in adapter_layers(model).values():
        assert torch.all(layer.lora_E[~layer.rank_mask] == 0)


def test_bfloat16_model():
    x = inputs().bfloat16()
    y0 = toy_model(torch.bfloat16)(x)
    model = adapted("pissa", dtype=torch.bfloat16)
    assert model[0].lora_A.dtype == torch.bfloat16
    # bf16 residual + factors: each rounded once (2^-8 relative), on outputs of size ~1.
    torch.testing.assert_close(model(x), y0, rtol=3e-2, atol=3e-2)


def test_bad_input():
    assert_raises_naming(lambda: adapted("loha"), ValueError, ["method", "pissa", "'loha'"])
    assert_raises_naming(lambda: adapted("pissa", rank=65), ValueError, ["rank", "64", "65"])
    assert_raises_naming(lambda: adapted("pissa", rank=0), ValueError, ["rank", "0"])
    assert_raises_naming(lambda: adapted("salt", rank=64), ValueError, ["rank", "63", "64"])
    assert_raises_naming(lambda: adapted("pissa", rank=True), TypeError, ["rank", "int", "bool"])
    assert_raises_naming(lambda: adapt(toy_model(), "pissa", targets=["nope"]), ValueError, ["targets", "nope"])
    assert_raises_naming(lambda: adapt(toy_model(), "pissa", targets=3), TypeError, ["targets", "3"])
    for m in CALIB:
        assert_raises_naming(lambda: adapt(toy_model(), m), ValueError, ["calib_batches", m, "None"])
        assert_raises_naming(lambda: adapt(toy_model(), m, calib_batches=[]), ValueError, ["calib_batches", "empty"])
    model = toy_model()
    with torch.no_grad():
        model[2].weight[0, 0] = math.nan
    assert_raises_naming(lambda: adapt(model, "pissa"), ValueError, ["2.weight", "finite"])
    assert_raises_naming(lambda: adapted("corda", corda_mode="x"), ValueError, ["corda_mode", "'x'"])
    assert_raises_naming(lambda: adapted("pissa", alpha=-1.0), ValueError, ["alpha", "-1"])


def test_targets_select_layers():
    model = adapt(toy_model(), "lora", targets=["2", "4"])
    assert set(adapter_layers(model)) == {"2", "4"}
    model = adapt(toy_model(), "lora", targets=r"[06]")
    assert set(adapter_layers(model)) == {"0", "6"}
    assert isinstance(adapt(toy_model(), "soka", rank=2, targets=["0"])[0], KronLinear)


def test_public_api():
    assert svdkernels.adapters.adapt is adapt
    assert isinstance(adapted("lora")[0], SVDLinear)
    assert "method=lora" in repr(adapted("lora")[0])
