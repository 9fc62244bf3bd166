"""Benchmark family ``lowrank_adam_step``: the fused GaLore Adam step of one weight alone.

Workloads (issue 13, item 4): a ``4096×4096`` weight at rank 128, and MiniLM-sized
FFN weights ``1536×384`` (right side, the projection on the 384 side) and ``384×1536``
(left side) at rank 32, each with float32 weights and with bfloat16 weights rounded
stochastically (Q-GaLore's low-precision weights); weight decay on. Quick mode: one
``512×256`` rank-16 weight.

Rows per workload:

- ``ours``: :func:`svdkernels.lowrank_adam_step` on the default backend (on the CPU the
  C++ kernel when ``svdkernels._C`` is built; the note says which);
- ``ours, reference backend``: the same call on the plain-PyTorch backend;
- ``torch AdamW (full rank)``: ``torch.optim.AdamW`` stepping the same weight shape
  (its moments full-size, the weight's dtype), the step GaLore replaces.

Accuracy: ``upd err`` = ``‖W − W64‖ / ‖W64 − W0‖``, the error of the weight after the
step against the same step in float64 (GaLore's for ours, AdamW's for torch's), in
units of the update's size; a bfloat16 weight's rounding is part of it (its spacing
is larger than one step's update, so the value is of order 1 there, unbiased under
stochastic rounding). ``vs ref`` = ``max |W − W_ref| / max |W64 − W0|``: ours against
the reference backend, 0 when every bit agrees.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

import svdkernels
from svdkernels.backends import select_backend, use_backend
from svdkernels.bench import Row, bench_device, register, time_fn
from svdkernels.ops.lowrank_adam_step import bias_corrected_step_size

LR, BETAS, EPS, WD, SCALE, STEP = 1e-3, (0.9, 0.999), 1e-8, 0.01, 0.25, 10


@dataclass(frozen=True)
class Workload:
    m: int
    n: int
    rank: int
    side: str

    def name(self, dtype: torch.dtype) -> str:
        return f"{self.m}x{self.n} r{self.rank} {self.side} {'bf16' if dtype == torch.bfloat16 else 'fp32'}"


def workloads(quick: bool) -> list[Workload]:
    if quick:
        return [Workload(512, 256, 16, "right")]
    return [Workload(4096, 4096, 128, "right"), Workload(1536, 384, 32, "right"), Workload(384, 1536, 32, "left")]


DTYPES = (torch.float32, torch.bfloat16)

LEGEND = (
    "upd err = ||W - W64|| / ||W64 - W0||: the weight after one step against the same step in float64, in units "
    "of the update (a bf16 weight's rounding included: its spacing exceeds one update, hence ~1, unbiased with "
    "stochastic rounding); vs ref = max|W - W_ref| / max|W64 - W0|, ours against the reference backend."
)


def _problem(wl: Workload, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """A weight, a gradient, an orthonormal basis [r, k] and moments after some steps."""
    g = torch.Generator().manual_seed(wl.m * 7 + wl.n)
    k = wl.n if wl.side == "right" else wl.m
    shape = (wl.m, wl.rank) if wl.side == "right" else (wl.rank, wl.n)
    t = {
        "W": torch.randn(wl.m, wl.n, generator=g) * 0.02,
        "G": torch.randn(wl.m, wl.n, generator=g) * 1e-3,
        "P": torch.linalg.qr(torch.randn(k, wl.rank, generator=g))[0].T.contiguous(),
        "m": torch.randn(shape, generator=g) * 1e-4,
        "v": torch.rand(shape, generator=g) * 1e-6,
    }
    t["W"], t["G"] = t["W"].to(dtype), t["G"].to(dtype)
    return {name: x.to(device) for name, x in t.items()}


def _galore64(wl: Workload, t: dict[str, torch.Tensor], step_size: float) -> torch.Tensor:
    """W after GaLore's step in float64."""
    W, G, P, m, v = (t[x].double() for x in ("W", "G", "P", "m", "v"))
    R = G @ P.T if wl.side == "right" else P @ G
    m = BETAS[0] * m + (1 - BETAS[0]) * R
    v = BETAS[1] * v + (1 - BETAS[1]) * R * R
    N = m / (v.sqrt() + EPS)
    W = W - step_size * (N @ P if wl.side == "right" else P.T @ N)
    return W - LR * WD * W


def _ours(wl: Workload, t: dict[str, torch.Tensor], step_size: float, sr_seed: int | None):
    """A call of the op on copies of the state (so each run starts from the same state)."""
    W, m, v = t["W"].clone(), t["m"].clone(), t["v"].clone()

    def step() -> torch.Tensor:
        svdkernels.lowrank_adam_step(W, t["G"], t["P"], m, v, step_size=step_size, side=wl.side, betas=BETAS,
                                     eps=EPS, decay=LR * WD, sr_seed=sr_seed)
        return W

    return step


def _adamw(t: dict[str, torch.Tensor]):
    """(step, W after one step from the same state in float64) of torch.optim.AdamW."""
    W = torch.nn.Parameter(t["W"].clone())
    W.grad = t["G"].clone()
    opt = torch.optim.AdamW([W], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    opt.step()  # creates the full-size state
    # Same state for the float64 check: moments as after STEP - 1 steps of this gradient.
    st = opt.state[W]
    st["exp_avg"].copy_(t["G"] * 0.5)
    st["exp_avg_sq"].copy_(t["G"].float() ** 2 * 0.5)
    st["step"].fill_(STEP - 1)
    W0, m0, v0 = W.detach().double(), st["exp_avg"].double(), st["exp_avg_sq"].double()
    g = t["G"].double()
    w64 = W0 * (1 - LR * WD)  # torch's AdamW: decay first
    m1 = BETAS[0] * m0 + (1 - BETAS[0]) * g
    v1 = BETAS[1] * v0 + (1 - BETAS[1]) * g * g
    bc1, bc2 = 1 - BETAS[0] ** STEP, 1 - BETAS[1] ** STEP
    w64 = w64 - LR / bc1 * m1 / ((v1 / bc2).sqrt() + EPS)
    return opt, W, W0, w64


def _upd_err(W: torch.Tensor, W0: torch.Tensor, W64: torch.Tensor) -> float:
    return float((W.double() - W64).norm() / (W64 - W0).norm())


def _time(fn, repeats: int) -> float:
    return time_fn(fn, repeats=repeats, warmup=1)[0]


@register("lowrank_adam_step", count=lambda quick: len(workloads(quick)) * len(DTYPES), legend=LEGEND)
def bench_lowrank_adam_step(quick: bool, repeats: int) -> Iterator[Row | str]:
    """Ours (default backend), ours on the reference backend and torch's AdamW step."""
    device = bench_device()
    step_size = bias_corrected_step_size(LR, *BETAS, STEP) * SCALE
    for wl in workloads(quick):
        for dtype in DTYPES:
            name = wl.name(dtype)
            yield name
            t = _problem(wl, dtype, device)
            sr = 1234 if dtype == torch.bfloat16 else None
            W0 = t["W"].double()
            W64 = _galore64(wl, t, step_size)
            backend = select_backend("lowrank_adam_step", device, has_cpp=True)
            ours = _ours(wl, t, step_size, sr)()
            with use_backend("reference"):
                ref = _ours(wl, t, step_size, sr)()
            scale = float((W64 - W0).abs().max())
            # The reference's bfloat16 path (float32 copies, int64 hashing) is slow on
            # big weights: fewer repeats there, said in the note.
            ref_repeats = repeats if dtype == torch.float32 or wl.m * wl.n <= 1 << 20 else min(repeats, 2)
            t_ours = _time(_ours(wl, t, step_size, sr), repeats)
            with use_backend("reference"):
                t_ref = _time(_ours(wl, t, step_size, sr), ref_repeats)
            opt, Wp, Wp0, w64 = _adamw(t)
            with torch.no_grad():
                opt.step()
            adamw_err = _upd_err(Wp.detach(), Wp0, w64)
            with torch.no_grad():
                t_adamw = _time(opt.step, repeats)
            yield Row(name, "ours", t_ours * 1e3, kind="ours",
                      errors={"upd err": _upd_err(ours, W0, W64),
                              "vs ref": float((ours.double() - ref.double()).abs().max()) / scale},
                      note=f"backend {backend}")
            yield Row(name, "ours, reference backend", t_ref * 1e3, errors={"upd err": _upd_err(ref, W0, W64)},
                      note="" if ref_repeats == repeats else f"median of {ref_repeats}")
            yield Row(name, "torch AdamW (full rank)", t_adamw * 1e3, errors={"upd err": adamw_err},
                      note=f"full-size moments, {dtype}".replace("torch.", ""))
