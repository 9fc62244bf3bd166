"""Benchmark family ``lowrank_quant``: the SVDQuant W4A16 + low-rank linear layer
on the CPU (the C++ kernel of ``lowrank_w4a16_linear``) against dense and int4 peers.

Workloads are decoding-sized calls of Llama-7B-shaped layers (``N x K`` =
4096x4096 and 11008x4096, 1 and 16 tokens, rank 32; ``--quick``: 512x1024). For
each workload, in the same run:

- ours: ``svdkernels.quant.lowrank_w4a16_linear`` with bfloat16 activations and
  the rank-32 branch (the C++ backend when ``svdkernels._C`` is built); also with
  float32 activations, and without the branch (r = 0, a "bare" lower bound);
- peers: ``F.linear`` with the dequantised weight (``deq(R) + L_up·L_down``) in
  float32 and in bfloat16, and ``torch.ops.aten._weight_int4pack_mm_for_cpu``
  (bfloat16 activations, the same int4 residual and scales, no low-rank branch);
- ours W4A4: ``lowrank_quantize_act`` + ``lowrank_w4a4_gemm`` (int4 activations,
  the same weight; its error includes the activations' int4 rounding), whose
  target is at most 1.2x the W4A16 row's time; and the two in one call,
  ``lowrank_w4a4_linear`` (the same result bit for bit);
- ours on each SIMD instruction-set path the C++ kernel has on this CPU (forced
  with the internal op's ``isa``), with the bytes per second it reaches against
  the measured streaming bandwidth (a sum over 256 MiB);
- a roofline line: the packed weight, scales, branch and activations read once,
  ``2·M·N·K + 2·M·r·(N + K)`` float32 FLOPs.

Weights are cold: every timed call reads a different copy of its method's
weights, cycling through copies that total at least :data:`COLD_BYTES`, far more
than the last-level cache, as decoding a model larger than the cache does (a warm
4096x4096 int4 layer, 8 MiB, would otherwise sit in a 32 MiB L3 between repeats).

Accuracy: ``rel err = ‖y − y_exact‖/‖y‖``, with ``y_exact`` the float64 product of
the same activations and the dequantised weights the method uses (with the
branch for ours and ``F.linear``, without it for ``_weight_int4pack_mm_for_cpu``),
so it measures each kernel's arithmetic, not the quantisation.
"""
from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from svdkernels.backends import select_backend
from svdkernels.bench import Row, device_peaks, register, roofline, roofline_row, table_peaks, time_fn
from svdkernels.ops.lowrank_quant import lowrank_w4a4_linear
from svdkernels.quant import (
    dequantize_weight,
    lowrank_quantize_act,
    lowrank_w4a4_gemm,
    lowrank_w4a16_linear,
    quantize_weight,
    unpack_int4,
)

CPU = torch.device("cpu")
COLD_BYTES = 256 * 2**20
"""Each method's weight copies total at least this many bytes (quick: 1/16 of it)."""
RANK = 32


@dataclass(frozen=True)
class Workload:
    """A linear layer ``N x K`` (out x in features) called on ``M`` tokens."""

    N: int
    K: int
    M: int
    rank: int = RANK

    @property
    def name(self) -> str:
        return f"{self.N}x{self.K} M={self.M} r={self.rank}"


def workloads(quick: bool) -> list[Workload]:
    """Llama-7B attention (4096x4096) and MLP (11008x4096) layers; quick: 512x1024."""
    if quick:
        return [Workload(512, 1024, 1), Workload(512, 1024, 16)]
    return [Workload(N, 4096, M) for N in (4096, 11008) for M in (1, 16)]


@dataclass(frozen=True)
class Layer:
    """One quantised layer: residual ``R`` in int4, a rank-``r`` branch, and the
    dequantised weight ``W = deq(R) + L_up·L_down`` (float32) the peers use."""

    qweight: torch.Tensor  # [N, K/2] uint8
    scales: torch.Tensor  # [N, K/64] float32
    L_down: torch.Tensor  # [r, K] float32
    L_up: torch.Tensor  # [N, r] float32

    def residual(self) -> torch.Tensor:
        """``deq(R)`` ``[N, K]`` float32."""
        return dequantize_weight(self.qweight, self.scales, dtype=torch.float32)


@functools.lru_cache(maxsize=1)
def layer(N: int, K: int, rank: int) -> Layer:
    """A layer shaped like a trained one: a decaying low-rank part plus noise,
    the branch its top ``rank`` directions, the rest quantised."""
    g = torch.Generator().manual_seed(0)
    k = 2 * rank
    U = torch.randn(N, k, generator=g)
    V = torch.randn(k, K, generator=g)
    decay = torch.logspace(0, -1.5, k)
    W = (U * decay) @ V / K + 0.02 * torch.randn(N, K, generator=g)
    L_up = (U[:, :rank] * decay[:rank]) / K**0.5
    L_down = V[:rank] / K**0.5
    # bfloat16-representable scales and branch, so float32 and bfloat16 runs share the layer.
    L_up, L_down = L_up.bfloat16().float(), L_down.bfloat16().float()
    qweight, scales = quantize_weight(W - L_up @ L_down, dtype=torch.bfloat16)
    return Layer(qweight, scales.float(), L_down.contiguous(), L_up.contiguous())


def exact(x: torch.Tensor, W: torch.Tensor, L_down: torch.Tensor | None, L_up: torch.Tensor | None) -> torch.Tensor:
    """``x·Wᵀ (+ (x·L_downᵀ)·L_upᵀ)`` in float64, ``W`` taken 1024 rows at a time."""
    x64 = x.double()
    y = torch.cat([x64 @ W[i : i + 1024].double().T for i in range(0, W.shape[0], 1024)], dim=1)
    if L_down is not None:
        y += (x64 @ L_down.double().T) @ L_up.double().T
    return y


def rel_err(y: torch.Tensor, y_exact: torch.Tensor) -> float:
    return float((y.double() - y_exact).norm() / y_exact.norm())


@dataclass(frozen=True)
class Method:
    """``prepare(layer) -> weights`` (outside the timing; copied for cold runs) and
    ``run(x, weights) -> y``; ``branch``: its exact result includes the low-rank branch."""

    name: str
    kind: str
    prepare: Callable[[Layer], tuple[torch.Tensor, ...]]
    run: Callable[..., torch.Tensor]
    act_dtype: torch.dtype
    branch: bool = True
    note: str = ""


def _ours(dtype: torch.dtype, rank: bool) -> Callable[[Layer], tuple[torch.Tensor, ...]]:
    def prepare(lay: Layer) -> tuple[torch.Tensor, ...]:
        L_down, L_up = (lay.L_down, lay.L_up) if rank else (lay.L_down[:0], lay.L_up[:, :0])
        return (lay.qweight, lay.scales.to(dtype), L_down.to(dtype).contiguous(), L_up.to(dtype).contiguous())

    return prepare


def _run_ours(x: torch.Tensor, qweight, scales, L_down, L_up) -> torch.Tensor:
    return lowrank_w4a16_linear(x, qweight, scales, L_down=L_down, L_up=L_up)


def _run_op(x: torch.Tensor, qweight, scales, L_down, L_up) -> torch.Tensor:
    # The same computation through the registered op: the eager fast path of
    # lowrank_w4a16_linear skips only this custom-op layer (ops/lowrank_quant.py).
    return torch.ops.svdkernels.lowrank_w4a16_linear(x, qweight, scales, L_down, L_up, None)


def _w4a4(lay: Layer) -> tuple[torch.Tensor, ...]:
    # No smoothing in this layer (λ = 1): the branch and residual as for W4A16.
    smooth = torch.ones(lay.L_down.shape[1], dtype=torch.bfloat16)
    return (lay.qweight, lay.scales.bfloat16(), smooth, lay.L_down.bfloat16(), lay.L_up.bfloat16())


def _run_w4a4(x: torch.Tensor, qweight, scales, smooth, L_down, L_up) -> torch.Tensor:
    xq, xscale, act = lowrank_quantize_act(x, smooth, L_down)
    return lowrank_w4a4_gemm(xq, xscale, qweight, scales, lowrank_act=act, L_up=L_up)


def _run_w4a4_fused(x: torch.Tensor, qweight, scales, smooth, L_down, L_up) -> torch.Tensor:
    return lowrank_w4a4_linear(x, smooth, L_down, qweight, scales, L_up)


def _run_isa(isa: int) -> Callable[..., torch.Tensor]:
    def run(x: torch.Tensor, qweight, scales, L_down, L_up) -> torch.Tensor:
        return torch.ops.svdkernels._cpp_lowrank_w4a16_linear(x, qweight, scales, L_down, L_up, None, isa)

    return run


def _dense(dtype: torch.dtype) -> Callable[[Layer], tuple[torch.Tensor, ...]]:
    def prepare(lay: Layer) -> tuple[torch.Tensor, ...]:
        return ((lay.residual() + lay.L_up @ lay.L_down).to(dtype),)

    return prepare


def _run_dense(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    return F.linear(x, W)


def _int4pack(lay: Layer) -> tuple[torch.Tensor, ...]:
    # torch's format: unsigned nibbles u with w = (u - 8)·scale + zero, scales and
    # zeros [K/64, N, 2]. Ours is signed q with w = q·scale: u = q + 8, zero 0.
    q = unpack_int4(lay.qweight).to(torch.int32) + 8
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    scales = lay.scales.T.contiguous()
    sz = torch.stack([scales, torch.zeros_like(scales)], dim=-1).bfloat16()
    return packed, sz


def _run_int4pack(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 64, sz)


OURS = "ours (lowrank_w4a16_linear)"
METHODS = (
    Method(OURS, "ours", _ours(torch.bfloat16, True), _run_ours, torch.bfloat16, note="bf16 act, int4 + r32"),
    Method("ours, float32 act", "ours", _ours(torch.float32, True), _run_ours, torch.float32, note="fp32 act, int4 + r32"),
    Method("ours through torch.ops", "bare", _ours(torch.bfloat16, True), _run_op, torch.bfloat16,
           note="same call via the custom-op layer (what the eager fast path skips)"),
    Method("ours without branch", "bare", _ours(torch.bfloat16, False), _run_ours, torch.bfloat16, branch=False,
           note="bf16 act, int4, r=0"),
    Method("ours W4A4", "peer", _w4a4, _run_w4a4, torch.bfloat16,
           note="lowrank_quantize_act + lowrank_w4a4_gemm, bf16 act quantised to int4 (error includes that)"),
    Method("ours W4A4, one call", "peer", _w4a4, _run_w4a4_fused, torch.bfloat16,
           note="lowrank_w4a4_linear: the pair fused (bit-identical), bf16 act quantised to int4"),
    Method("F.linear fp32", "peer", _dense(torch.float32), _run_dense, torch.float32, note="dequantised weight"),
    Method("F.linear bf16", "peer", _dense(torch.bfloat16), _run_dense, torch.bfloat16, note="dequantised weight"),
    Method("_weight_int4pack_mm_for_cpu", "peer", _int4pack, _run_int4pack, torch.bfloat16, branch=False,
           note="bf16 act, same int4 residual, no branch"),
)


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(
    method: Method, wl: Workload, lay: Layer, x32: torch.Tensor, exact_fn: Callable[[torch.Tensor, bool], torch.Tensor],
    cold_bytes: int, repeats: int,
) -> Row:
    """Time ``method`` on cold weights (median of ``repeats``) and measure its error."""
    weights = method.prepare(lay)
    size = _nbytes(weights)
    n_copies = math.ceil(cold_bytes / size)
    copies = [weights] + [tuple(t.clone() for t in weights) for _ in range(n_copies - 1)]
    x = x32.to(method.act_dtype)
    cycle = itertools.cycle(copies)
    t, y = time_fn(lambda: method.run(x, *next(cycle)), repeats=repeats, warmup=n_copies, device=CPU)
    return Row(
        wl.name,
        method.name,
        t * 1e3,
        kind=method.kind,
        errors={"rel err": rel_err(y, exact_fn(x, method.branch))},
        note=f"{method.note}; weights {size / 2**20:.3g} MiB",
        extra={"weight_bytes": size, "copies": n_copies},
    )


def cost(wl: Workload) -> tuple[float, dict[torch.dtype, float]]:
    """Bytes our bfloat16 call must move and its FLOPs (bfloat16 products: the
    roofline takes the float32 peak where bfloat16 is not native)."""
    N, K, M, r = wl.N, wl.K, wl.M, wl.rank
    bytes_moved = N * K / 2 + N * (K // 64) * 2 + r * (N + K) * 2 + M * (K + N) * 2
    return bytes_moved, {torch.bfloat16: 2.0 * M * N * K + 2.0 * M * r * (N + K)}


ISA_NAMES = ("portable C++", "AVX2", "AVX-512", "AVX-512 + BF16 dot products")


def isa_methods() -> list[Method]:
    """Ours (bfloat16 activations, r32) forced onto each SIMD path of the C++ kernel
    this CPU runs (the portable loop is left out: a scalar fallback, 10x slower)."""
    if select_backend("lowrank_w4a16_linear", CPU, has_cpp=True) != "cpp":
        return []
    return [Method(f"ours, {ISA_NAMES[isa]} path", "bare", _ours(torch.bfloat16, True), _run_isa(isa),
                   torch.bfloat16, note=f"isa={isa}, bf16 act, int4 + r32")
            for isa in range(1, torch.ops.svdkernels._cpp_best_isa() + 1)]


def backend_note() -> str:
    """Which backend (and C++ instruction set) ours runs on here."""
    name = select_backend("lowrank_w4a16_linear", CPU, has_cpp=True)
    if name != "cpp":
        return f"{name} backend"
    return f"C++ {ISA_NAMES[torch.ops.svdkernels._cpp_best_isa()]}"


LEGEND = (
    "rel err = |y - y_exact| / |y_exact|, y_exact the float64 product of the same activations and the "
    "dequantised weights the method uses (deq(R) + L_up L_down; int4pack: deq(R) alone): each kernel's "
    "arithmetic, not the quantisation error.\n"
    "Cold weights: each call reads another copy of its weights (copies >= 256 MiB in all, 16 MiB with --quick), "
    "as decoding does. "
    "Targets (issues 4, 19): >= 3x faster than F.linear fp32 at 1 token; within 1.3x of "
    "_weight_int4pack_mm_for_cpu; on AVX2-only CPUs too (the AVX2 path row; torch's peers follow "
    "ATEN_CPU_CAPABILITY / MKL_ENABLE_INSTRUCTIONS). Ours W4A4 (issue 19): at most 1.2x ours' time."
)


@register("lowrank_quant", count=lambda quick: len(workloads(quick)), legend=LEGEND)
def bench_lowrank_quant(quick: bool, repeats: int) -> Iterator[Row | str]:
    """Ours, its variants, the peers and the roofline on every workload (CPU)."""
    peaks = device_peaks(CPU, quick)
    cold = COLD_BYTES // 16 if quick else COLD_BYTES
    for wl in workloads(quick):
        yield wl.name
        lay = layer(wl.N, wl.K, wl.rank)
        x32 = torch.randn(wl.M, wl.K, generator=torch.Generator().manual_seed(wl.M))
        R = lay.residual()
        done: dict[tuple[torch.dtype, bool], torch.Tensor] = {}

        def exact_fn(x: torch.Tensor, branch: bool) -> torch.Tensor:
            # x is x32 rounded to the method's activation dtype: one result per (dtype, branch).
            key = (x.dtype, branch)
            if key not in done:
                done[key] = exact(x, R, lay.L_down, lay.L_up) if branch else exact(x, R, None, None)
            return done[key]

        rows = [measure(m, wl, lay, x32, exact_fn, cold, repeats) for m in METHODS]
        rows[0].note = f"{backend_note()}; {rows[0].note}"
        bytes_moved, flops = cost(wl)
        for row in rows[:1] + [measure(m, wl, lay, x32, exact_fn, cold, repeats) for m in isa_methods()]:
            rate = bytes_moved / (row.time_ms / 1e3)
            row.note += f"; {rate / 1e9:.2f} GB/s = {rate / peaks.bandwidth:.2f}x the measured stream"
            if row is not rows[0]:
                rows.append(row)
        yield from rows
        yield roofline_row(wl.name, rows[0].time_ms / 1e3, bytes_moved, flops, peaks,
                           what="int4 weight + bf16 scales and branch, read from DRAM")
        yield gpu_roofline_row(wl, bytes_moved, flops)


def gpu_roofline_row(wl: Workload, bytes_moved: float, flops: dict[torch.dtype, float]) -> Row:
    """Where the kernel is meant to run: our bytes and FLOPs at an H100's limits,
    against bf16 ``F.linear`` (weights 2 bytes each) at the same limits."""
    gpu = table_peaks("H100")
    ours = roofline(bytes_moved, flops, gpu)
    dense_bytes = 2.0 * (wl.N * wl.K + wl.M * (wl.K + wl.N))
    dense = roofline(dense_bytes, {torch.bfloat16: 2.0 * wl.M * wl.N * wl.K}, gpu)
    return Row(
        wl.name, "roofline H100 (GPU estimate)", ours.limit_s * 1e3, kind="roofline",
        note=(f"ours {ours.bytes / 1e6:.1f} MB ({ours.bound}-bound) vs bf16 F.linear {dense.bytes / 1e6:.1f} MB "
              f"({dense.bound}-bound) at {dense.limit_s * 1e3:.4f} ms: {dense.limit_s / ours.limit_s:.2f}x less time "
              "at the limit"),
        extra={"bytes": ours.bytes, "dense_bf16_bytes": dense.bytes, "dense_bf16_limit_ms": dense.limit_s * 1e3},
    )
