"""The benchmark suite behind ``python -m svdkernels bench``.

One module per op family (``svdkernels/bench/rsvd.py``, ...), each registering a
generator of result rows with :func:`register`; :mod:`svdkernels.bench.runner`
holds what they share (timing, tables, JSON, roofline). Importing this package
imports no family: :func:`run` discovers them.
"""
from svdkernels.bench.runner import (
    FAMILIES,
    Peaks,
    Roofline,
    Row,
    bench_device,
    device_peaks,
    format_table,
    load_families,
    register,
    roofline,
    roofline_row,
    run,
    time_fn,
)

__all__ = [
    "FAMILIES",
    "Peaks",
    "Roofline",
    "Row",
    "bench_device",
    "device_peaks",
    "format_table",
    "load_families",
    "register",
    "roofline",
    "roofline_row",
    "run",
    "time_fn",
]
