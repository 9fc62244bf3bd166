"""Benchmark family ``adapters``: SVD adapter initialisation and training overhead.

Workloads (issue 6):

- ``init``: every linear layer of Llama-7B-shaped decoder blocks, scaled to fit the
  CPU (hidden ``d``, MLP ``i ≈ 2.69·d``: q, k, v, o ``d×d``; gate, up ``i×d``; down
  ``d×i``), initialised with PiSSA at rank 16. Weights have a slowly decaying
  spectrum ``σ_j = (j+1)^-0.5`` (trained weights are not flat, nor fast-decaying).
  Rows: ``svdkernels.adapt(model, "pissa")`` against peft's
  ``init_lora_weights="pissa"`` (a full SVD per layer) and ``"pissa_niter_4"``
  (``svd_lowrank(q=r, niter=4)`` per layer). ``ratio`` is the principal-subspace
  error: ``‖W − s·B·A‖_F`` over Eckart–Young's optimum, mean (and max) over layers.
- ``fwd+bwd``: one ``d×d`` layer, ``tokens`` rows with the input requiring grad,
  each method at rank 16 against the frozen ``F.linear`` and peft's LoRA at the same
  rank. ``overhead = time / frozen − 1``; ``err`` is the output's relative error
  against float64 math on the dense effective weight.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from svdkernels.adapters import ALL_METHODS, adapt, adapter_layers
from svdkernels.bench import Row, bench_device, register, time_fn

RANK = 16


@dataclass(frozen=True)
class InitWorkload:
    d: int
    blocks: int

    @property
    def mlp(self) -> int:
        return int(round(self.d * 11008 / 4096 / 8)) * 8

    @property
    def name(self) -> str:
        return f"init pissa r{RANK}: {self.blocks} Llama blocks d{self.d} i{self.mlp}"


@dataclass(frozen=True)
class StepWorkload:
    tokens: int
    d: int

    @property
    def name(self) -> str:
        return f"fwd+bwd N{self.tokens} d{self.d} r{RANK}"


def workloads(quick: bool) -> tuple[list[InitWorkload], list[StepWorkload]]:
    if quick:
        return [InitWorkload(128, 1)], [StepWorkload(64, 128)]
    return [InitWorkload(1024, 2)], [StepWorkload(2048, 1024)]


LEGEND = (
    "init: ratio = ||W - s.B.A||_F / optimal rank-16 error (mean over layers; max in the note); target: ours "
    "faster than peft pissa_niter_4 and more accurate. fwd+bwd: overhead = time / frozen F.linear - 1; "
    "err = output relative error against float64 on the dense effective weight."
)

_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _Block(nn.Module):
    def __init__(self, d: int, i: int) -> None:
        super().__init__()
        shapes = {"q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "o_proj": (d, d),
                  "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}
        for name, (n_in, n_out) in shapes.items():
            setattr(self, name, nn.Linear(n_in, n_out, bias=False))


def _decaying(m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=gen))[0]
    V = torch.linalg.qr(torch.randn(n, k, generator=gen))[0]
    s = torch.arange(1, k + 1, dtype=torch.float32).pow(-0.5)
    return (U * s) @ V.T


def _init_model(wl: InitWorkload) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    model = nn.ModuleList([_Block(wl.d, wl.mlp) for _ in range(wl.blocks)])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(_decaying(m.out_features, m.in_features, gen))
                m.weight.requires_grad_(False)
    return model


def optimal_errors(base: nn.Module) -> dict[str, tuple[torch.Tensor, float]]:
    """Per linear layer of ``base``: its weight and Eckart–Young's rank-``RANK`` error."""
    return {n: (m.weight.detach().clone(), float(torch.linalg.svdvals(m.weight.double())[RANK:].pow(2).sum().sqrt()))
            for n, m in base.named_modules() if isinstance(m, nn.Linear)}


def subspace_ratios(model: nn.Module, optimal: dict[str, tuple[torch.Tensor, float]]) -> list[float]:
    """``‖W − s·B·A‖_F`` over the optimal rank-``RANK`` error, per adapted layer."""
    return [float(torch.linalg.matrix_norm(optimal[n][0] - BA) / optimal[n][1])
            for n, BA in _principal_parts(model).items()]


def _principal_parts(model: nn.Module) -> dict[str, torch.Tensor]:
    """``s·B·A`` per adapted layer, for ours (SVDLinear) and peft's LoRA layers."""
    out = {}
    for name, m in model.named_modules():
        if hasattr(m, "lora_B") and isinstance(m.lora_B, nn.ModuleDict):  # peft
            out[name.removeprefix("base_model.model.")] = (
                m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight).detach()
    for name, m in adapter_layers(model).items():
        out[name] = (m.scaling * m.lora_B @ m.lora_A).detach()
    return out


def _bench_init(wl: InitWorkload, repeats: int) -> Iterator[Row | str]:
    from peft import LoraConfig, get_peft_model

    yield wl.name
    base = _init_model(wl)
    optimal = optimal_errors(base)
    runs = {
        "ours (adapt pissa, batched rsvd)": lambda m: adapt(m, "pissa", rank=RANK, seed=0),
        "peft pissa_niter_4": lambda m: get_peft_model(m, LoraConfig(
            r=RANK, lora_alpha=RANK, target_modules=list(_PROJ), init_lora_weights="pissa_niter_4")),
        "peft pissa (full SVD)": lambda m: get_peft_model(m, LoraConfig(
            r=RANK, lora_alpha=RANK, target_modules=list(_PROJ), init_lora_weights="pissa")),
    }
    reps = max(1, min(repeats, 3))  # each run initialises the whole block set
    for label, fn in runs.items():
        # One warm-up (first-call costs of either library); the last model is kept for
        # its error, earlier ones are freed as a one-off initialisation would.
        t, model = time_fn(lambda: fn(copy.deepcopy(base)), repeats=reps, warmup=1, device=torch.device("cpu"))
        ratios = subspace_ratios(model, optimal)
        yield Row(wl.name, label, t * 1e3, kind="ours" if label.startswith("ours") else "peer",
                  errors={"ratio": sum(ratios) / len(ratios)},
                  note=f"max ratio {max(ratios):.4f} over {len(ratios)} layers")


def _step_model(method: str, base: nn.Linear, calib: list[torch.Tensor]) -> nn.Module:
    model = nn.Sequential(copy.deepcopy(base))
    if method == "peft LoRA":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["0"]))
        with torch.no_grad():  # B = 0 at init would make the branch trivially cheap to check; train-like B
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.01)
        return model
    return adapt(model, method, rank=RANK, calib_batches=calib if method in ("corda", "eva") else None)


def _bench_step(wl: StepWorkload, repeats: int) -> Iterator[Row | str]:
    device = bench_device()
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(wl.d, wl.d, bias=False)
    with torch.no_grad():
        base.weight.copy_(_decaying(wl.d, wl.d, gen) * wl.d**0.5 / 8)
    base.weight.requires_grad_(False)
    calib = [torch.randn(256, wl.d, generator=gen)]
    x = torch.randn(wl.tokens, wl.d, generator=gen).to(device).requires_grad_(True)
    g = torch.randn(wl.tokens, wl.d, generator=gen).to(device)

    def step(m: nn.Module):
        def run():
            y = m(x)
            y.backward(g)
            return y
        return run

    yield wl.name
    frozen = base.to(device)
    t_base = time_fn(step(frozen), repeats=repeats)[0]
    for method in (*[m for m in ALL_METHODS if m != "soka"], "peft LoRA"):
        model = _step_model(method, base, calib).to(device)
        with torch.no_grad():
            y = model(x)
            if method == "peft LoRA":
                W = base.weight.double() + next(iter(_principal_parts(model).values())).double()
            else:
                layer = model[0]
                W = (0 if layer.weight is None else layer.weight.double()) + layer.delta_weight().double()
            want = x.double() @ W.T
            err = float((y.double() - want).norm() / want.norm())
        t = time_fn(step(model), repeats=repeats)[0]
        yield Row(wl.name, method if method == "peft LoRA" else f"ours {method}", t * 1e3,
                  kind="ours" if method == "lora" else "peer",
                  errors={"overhead": t / t_base - 1, "err": err})
    yield Row(wl.name, "frozen F.linear", t_base * 1e3, kind="bare", errors={"overhead": 0.0})


@register("adapters", count=lambda quick: sum(len(w) for w in workloads(quick)), legend=LEGEND)
def bench_adapters(quick: bool, repeats: int) -> Iterator[Row | str]:
    """PiSSA initialisation against peft; per-method training-step overhead."""
    inits, steps = workloads(quick)
    for wl in inits:
        yield from _bench_init(wl, repeats)
    for wl in steps:
        yield from _bench_step(wl, repeats)
