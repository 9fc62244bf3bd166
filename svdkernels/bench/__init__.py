"""The benchmark suite behind ``python -m svdkernels bench``.

One module per op family or layer (``svdkernels/bench/rsvd.py``, ...), each
registering a generator of result rows with :func:`register`. The machinery they
share sits beside them, one module per concern: ``rows.py`` (:class:`Row`),
``registry.py`` (:func:`register`, discovery), ``timing.py`` (:func:`time_fn`),
``peaks.py`` (device peaks, roofline rows), ``report.py`` (tables, JSON, PNG) and
``runner.py`` (:func:`run`). Families import it from here. Importing this package
imports no family: :func:`run` discovers them.
"""
from svdkernels.bench.registry import FAMILIES, load_families, register
from svdkernels.bench.report import format_table
from svdkernels.bench.peaks import Peaks, Roofline, device_peaks, roofline, roofline_row, table_peaks
from svdkernels.bench.rows import Row
from svdkernels.bench.runner import run
from svdkernels.bench.timing import bench_device, time_fn

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
    "table_peaks",
    "time_fn",
]
