"""Peak FLOP/s and bandwidth of a device (datasheet table for GPUs, measured
otherwise) and the roofline: the time a workload's bytes and FLOPs take at the limit."""
from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from svdkernels.bench.rows import Row


@dataclass(frozen=True)
class Peaks:
    """Peak matmul FLOP/s per operand dtype name and memory bandwidth (bytes/s)."""

    flops: dict[str, float]
    bandwidth: float
    source: str  # "measured" or "table: <gpu>"

    def flops_for(self, dtype: torch.dtype) -> float:
        """Peak for ``dtype``; the float32 peak for a dtype that was not measured."""
        return self.flops.get(_dtype_name(dtype), self.flops["float32"])


# Dense (no sparsity) datasheet peaks: FLOP/s per operand dtype, bytes/s.
# float32 is the non-tensor-core rate: torch's default matmul does not use TF32.
_GPU_PEAKS: tuple[tuple[str, dict[str, float], float], ...] = (
    ("H200", {"float32": 67e12, "bfloat16": 989e12, "float16": 989e12}, 4.8e12),
    ("H100 PCIe", {"float32": 51e12, "bfloat16": 756e12, "float16": 756e12}, 2.0e12),
    ("H100 NVL", {"float32": 60e12, "bfloat16": 835e12, "float16": 835e12}, 3.9e12),
    ("H100", {"float32": 67e12, "bfloat16": 989e12, "float16": 989e12}, 3.35e12),
    ("A100-SXM4-40GB", {"float32": 19.5e12, "bfloat16": 312e12, "float16": 312e12}, 1.555e12),
    ("A100-PCIE-40GB", {"float32": 19.5e12, "bfloat16": 312e12, "float16": 312e12}, 1.555e12),
    ("A100", {"float32": 19.5e12, "bfloat16": 312e12, "float16": 312e12}, 2.0e12),
)


def table_peaks(gpu: str = "H100") -> Peaks:
    """Datasheet peaks of a GPU from the table, for rooflines of where a kernel
    would run when the bench itself runs elsewhere (the CPU)."""
    _, flops, bw = next(p for p in _GPU_PEAKS if p[0] == gpu)
    return Peaks(dict(flops), bw, f"table: {gpu}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@functools.cache
def device_peaks(device: torch.device, quick: bool = False) -> Peaks:
    """Peak FLOP/s and bandwidth of ``device``, measured once per process.

    CUDA: the datasheet table for A100/H100/H200, else measured. Otherwise
    measured: the best of a few large square matmuls per dtype (bfloat16 only
    where it is native, since only then do ops plan bfloat16 products) and of a
    sum over a 256 MiB tensor for bandwidth. ``quick`` uses a smaller matmul.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops, bw in _GPU_PEAKS:
            if key in name:
                return Peaks(dict(flops), bw, f"table: {name}")
    from svdkernels.reference.rsvd import native_bf16

    n = 1024 if quick else 3072
    dtypes = [torch.float32] + ([torch.bfloat16] if native_bf16(device) else [])
    flops = {}
    for dtype in dtypes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        t = _best_time(lambda: torch.matmul(a, b), device, 3)
        flops[_dtype_name(dtype)] = 2 * n**3 / t
    x = torch.ones(64 * 2**20, device=device)  # 256 MiB: far beyond any cache
    bandwidth = x.numel() * x.element_size() / _best_time(x.sum, device, 5)
    return Peaks(flops, bandwidth, "measured")


def _best_time(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    # A peak is the best case, so take the minimum, not the median.
    fn()
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


@dataclass(frozen=True)
class Roofline:
    """What a computation must do and how long that takes at the hardware limit."""

    bytes: float
    flops: float
    limit_s: float
    bound: str  # "compute" or "memory"


def roofline(bytes_moved: float, flops: Mapping[torch.dtype, float], peaks: Peaks) -> Roofline:
    """Time at the limit: the larger of the compute time (FLOPs per dtype at that
    dtype's peak) and the memory time (``bytes_moved`` at peak bandwidth)."""
    compute = sum(f / peaks.flops_for(dtype) for dtype, f in flops.items())
    memory = bytes_moved / peaks.bandwidth
    return Roofline(
        bytes_moved,
        sum(flops.values()),
        max(compute, memory),
        "compute" if compute >= memory else "memory",
    )


def roofline_row(
    workload: str,
    measured_s: float,
    bytes_moved: float,
    flops: Mapping[torch.dtype, float],
    peaks: Peaks,
    what: str = "",
) -> Row:
    """A ``roofline`` row: the time at the device's limit and ``measured / limit``."""
    r = roofline(bytes_moved, flops, peaks)
    ratio = measured_s / r.limit_s
    by_dtype = ", ".join(f"{f / 1e9:.3g} GFLOP {_dtype_name(d)}" for d, f in flops.items())
    note = (
        f"ours at {ratio:.2f}x the limit; {r.bytes / 1e6:.0f} MB, {by_dtype} "
        f"({r.bound}-bound){'; ' + what if what else ''}"
    )
    return Row(
        workload,
        "roofline (hw limit)",
        r.limit_s * 1e3,
        kind="roofline",
        note=note,
        extra={
            "bytes": r.bytes,
            "flops": r.flops,
            "flops_by_dtype": {_dtype_name(d): f for d, f in flops.items()},
            "bound": r.bound,
            "measured_over_limit": ratio,
        },
    )
