"""Timing: the bench device and :func:`time_fn` (median wall time on the CPU, CUDA
events or ``triton.testing.do_bench`` on a GPU)."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

_device: torch.device | None = None


def set_bench_device(device: torch.device | None) -> None:
    """Make ``device`` what :func:`bench_device` returns (``None``: back to the default)."""
    global _device
    _device = device


def bench_device() -> torch.device:
    """The device the benchmarks run on: the one :func:`run` was given, else CUDA if present."""
    if _device is not None:
        return _device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def time_fn(
    fn: Callable[[], T], *, repeats: int, warmup: int = 1, device: torch.device | None = None
) -> tuple[float, T]:
    """Median wall time of ``fn()`` in seconds, and the result of its last call.

    CPU: ``warmup`` untimed calls, then the median of ``repeats`` timed with
    ``time.perf_counter``. CUDA: ``triton.testing.do_bench`` (median) when triton
    imports, else the median of ``repeats`` CUDA-event timings.
    """
    device = device or bench_device()
    if device.type == "cuda":
        return _time_cuda(fn, repeats, warmup)
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out  # type: ignore[return-value]


def _time_cuda(fn: Callable[[], T], repeats: int, warmup: int) -> tuple[float, T]:
    out = fn()  # the result to return, and a first warm-up
    torch.cuda.synchronize()
    try:
        # Imported here: importing triton at module import time is forbidden, and
        # on the CPU it is never needed.
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return do_bench(fn, return_mode="median") / 1e3, out
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), out
