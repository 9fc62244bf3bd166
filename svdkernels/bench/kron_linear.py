"""Benchmark family ``kron_linear``: Kronecker adapter overhead over the frozen layer.

Workloads (issue 3): 2048 tokens through a ``d×d`` linear layer with a LoKr
adapter of peft's default shape (r = 8, alpha = 8: ``w1`` dense, ``w2 = w2_a·w2_b``
when 8 < max(w2 dims)/2) at d = 1024 (32×32 factors) and d = 4096 (64×64).

Rows per workload and pass (forward; forward+backward with the input requiring
grad, as in any layer but the first):

- ``frozen base``: ``F.linear`` alone, the reference time;
- ``ours``: :class:`KronLinear` (base + ``kron_linear``), loaded from the peft
  adapter with :func:`load_lokr` (on the CPU: the C++ kernels when ``svdkernels._C``
  is built, the fused backward among them);
- ``ours, reference backend``: the same layer on the plain-PyTorch backend (its
  backward is torch GEMMs over activation-sized intermediates);
- ``peft LoKr``: peft's layer with the same adapter (it builds ``torch.kron`` of the
  factors, ``out×in``, on every call).

``overhead`` is ``time / base − 1``. ``err`` is the adapter output's relative
error against float64 math on the materialised product. The roofline rows give
the Kronecker part alone (bytes of x, y and the factors; its FLOPs) at this
device's limits and at an H100's (bf16 operands), where the kernel would run.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from svdkernels.adapters import load_lokr
from svdkernels.backends import select_backend, use_backend
from svdkernels.ops.kron_linear_cpp import use_lowrank_b
from svdkernels.bench import Row, bench_device, device_peaks, register, roofline_row, table_peaks, time_fn


@dataclass(frozen=True)
class Workload:
    tokens: int
    d: int
    lokr_r: int = 8

    @property
    def name(self) -> str:
        return f"N{self.tokens} d{self.d}"


def workloads(quick: bool) -> list[Workload]:
    if quick:
        return [Workload(64, 256)]
    return [Workload(2048, 1024), Workload(2048, 4096)]


LEGEND = (
    "overhead = time / frozen base - 1 (target: ours <= +15%); err = relative error of the adapter's output "
    "against float64 on the materialised Kronecker product; roofline = the Kronecker part alone at the "
    "device's limits (and at an H100's with bf16 operands)."
)


class _Layer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _models(wl: Workload, path: str, device: torch.device) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(frozen base, peft LoKr, ours) on the same weights and adapter."""
    from peft import LoKrConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    base = _Layer(wl.d).to(device)
    base.proj.weight.requires_grad_(False)
    cfg = LoKrConfig(r=wl.lokr_r, alpha=wl.lokr_r, target_modules=["proj"], init_weights=False)
    peft_model = get_peft_model(copy.deepcopy(base), cfg)
    peft_model.save_pretrained(path)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), path, is_trainable=True)
    ours = load_lokr(copy.deepcopy(base), path)
    return base, peft_model, ours


def _delta_error(model: nn.Module, base: nn.Module, x: torch.Tensor, want: torch.Tensor) -> float:
    with torch.no_grad():
        got = (model(x) - base(x)).double()
    return float((got - want).norm() / want.norm())


def _time(fn, repeats: int) -> float:
    return time_fn(fn, repeats=repeats, warmup=1)[0]


@register("kron_linear", count=lambda quick: 2 * len(workloads(quick)), legend=LEGEND)
def bench_kron_linear(quick: bool, repeats: int) -> Iterator[Row | str]:
    """Forward and forward+backward of ours, peft LoKr and the frozen base."""
    import tempfile

    device = bench_device()
    peaks = device_peaks(device, quick)
    for wl in workloads(quick):
        with tempfile.TemporaryDirectory() as path:
            base, peft_model, ours = _models(wl, path, device)
        x = torch.randn(wl.tokens, wl.d, device=device)
        layer = ours.proj
        want = (x.double() @ layer.delta_weight().double().T)
        errs = {"ours": _delta_error(ours, base, x, want), "peft LoKr": _delta_error(peft_model, base, x, want)}
        with use_backend("reference"):
            errs["ours_ref"] = _delta_error(ours, base, x, want)
        xg = x.clone().requires_grad_(True)

        def fwd(m: nn.Module):
            return lambda: m(x)

        def fwd_bwd(m: nn.Module):
            def step():
                y = m(xg)
                y.backward(torch.ones_like(y))
                return y
            return step

        for label, make in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            name = f"{wl.name} {label}"
            yield name
            with torch.set_grad_enabled(label != "fwd"):
                t_base = _time(make(base), repeats)
                t_ours = _time(make(ours), repeats)
                t_peft = _time(make(peft_model), repeats)
                with use_backend("reference"):
                    t_ref = _time(make(ours), repeats)
            yield Row(name, "ours (KronLinear)", t_ours * 1e3, kind="ours",
                      errors={"overhead": t_ours / t_base - 1, "err": errs["ours"]},
                      note=f"backend {select_backend('kron_linear', device, has_cpp=True)}")
            yield Row(name, "ours, reference backend", t_ref * 1e3,
                      errors={"overhead": t_ref / t_base - 1, "err": errs["ours_ref"]})
            yield Row(name, "peft LoKr", t_peft * 1e3, errors={"overhead": t_peft / t_base - 1, "err": errs["peft LoKr"]})
            yield Row(name, "frozen base F.linear", t_base * 1e3, kind="bare", errors={"overhead": 0.0})
        # The Kronecker part of the forward pass alone: read x, write y, read the factors.
        A, B = layer.factor("A"), layer.factor("B")
        (a1, a2), (b1, b2) = layer.a_shape, layer.b_shape
        flops = 2 * wl.tokens * a2 * b1 * (b2 + a1)  # the dense product (the Triton kernel's)
        if device.type == "cpu" and not isinstance(B, torch.Tensor) and use_lowrank_b([A] if isinstance(
                A, torch.Tensor) else list(A), list(B)):
            # The C++ kernels take a low-rank B through its rank k.
            flops_here = 2 * wl.tokens * layer.num_terms * B[0].shape[-1] * (a2 * b2 + a1 * a2 + a1 * b1)
        else:
            flops_here = flops
        factor_elems = sum(t.numel() for f in (A, B) for t in ((f,) if isinstance(f, torch.Tensor) else f))
        elems = wl.tokens * 2 * wl.d + factor_elems
        with torch.no_grad():
            from svdkernels import kron_linear

            t_kron = _time(lambda: kron_linear(x, A, B, scale=layer.scale), repeats)
        yield roofline_row(f"{wl.name} fwd", t_kron, elems * x.element_size(), {x.dtype: flops_here}, peaks,
                           what=f"kron_linear alone, measured {t_kron * 1e3:.2f} ms")
        gpu = table_peaks("H100")
        gpu_row = roofline_row(f"{wl.name} fwd", t_kron, elems * 2, {torch.bfloat16: flops}, gpu)
        gpu_row.method = "roofline H100 bf16"
        gpu_row.note = (f"kron_linear alone on an H100 at the limit: {gpu_row.extra['bytes'] / 1e6:.1f} MB, "
                        f"{flops / 1e9:.2f} GFLOP ({gpu_row.extra['bound']}-bound); the frozen bf16 base at "
                        f"its limit: {max(2 * wl.tokens * wl.d ** 2 / gpu.flops['bfloat16'], 2 * (2 * wl.tokens * wl.d + wl.d ** 2) / gpu.bandwidth) * 1e3:.3f} ms")
        yield gpu_row
