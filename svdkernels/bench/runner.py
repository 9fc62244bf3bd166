"""The machinery every benchmark family shares.

A family is a generator function registered with :func:`register`; it measures
its workloads and yields :class:`Row` objects (and, optionally, a workload's name
as a plain string just before measuring it, which moves the progress bar). This
module times callables (:func:`time_fn`), knows the device's peak FLOP/s and
bandwidth (:func:`device_peaks`) for the roofline line (:func:`roofline_row`),
prints one table per family and writes ``bench.json`` (plus ``bench.png`` when
matplotlib is installed). :func:`run` ties it together for ``python -m svdkernels bench``.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import math
import os
import pkgutil
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")

# ---------------------------------------------------------------------------
# Result rows


@dataclass
class Row:
    """One line of a family's table (and one entry of its JSON list).

    ``kind`` is ``"ours"`` (the row every other row of the workload is compared
    with), ``"peer"``, ``"bare"`` (a lower bound built from the same products) or
    ``"roofline"`` (``time_ms`` is then the time at the hardware limit).
    ``errors`` maps column headers to accuracy metrics; ``vs_ours`` is filled in
    by the runner: ``time_ms / ours.time_ms`` (> 1 means ours is faster).
    """

    workload: str
    method: str
    time_ms: float | None
    kind: str = "peer"
    errors: dict[str, float] = field(default_factory=dict)
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    family: str = ""
    vs_ours: float | None = None


def fill_vs_ours(rows: Sequence[Row]) -> None:
    """Set ``vs_ours`` on every timed row of a workload that has an ``ours`` row."""
    ours = {}
    for row in rows:
        if row.kind == "ours" and row.time_ms:
            ours.setdefault(row.workload, row.time_ms)
    for row in rows:
        base = ours.get(row.workload)
        if base and row.time_ms is not None:
            row.vs_ours = row.time_ms / base


# ---------------------------------------------------------------------------
# Family registry


@dataclass(frozen=True)
class Family:
    """A registered benchmark family (see :func:`register`)."""

    name: str
    fn: Callable[[bool, int], Iterable[Row | str]]
    count: Callable[[bool], int] | None = None
    legend: str = ""


FAMILIES: dict[str, Family] = {}


def register(
    name: str, *, count: Callable[[bool], int] | None = None, legend: str = ""
) -> Callable[[T], T]:
    """Register ``fn(quick, repeats)`` as benchmark family ``name``.

    ``fn`` yields :class:`Row` objects, and may yield a workload's name (a ``str``)
    right before measuring it. ``count(quick)`` is the number of workloads, for
    the progress bar's total; ``legend`` is printed under the family's table to
    explain its error columns.
    """

    def deco(fn: T) -> T:
        if name in FAMILIES:
            raise ValueError(f"register(name): family {name!r} is already registered")
        FAMILIES[name] = Family(name, fn, count, legend)  # type: ignore[arg-type]
        return fn

    return deco


def load_families() -> dict[str, Family]:
    """Import every module of ``svdkernels.bench``, each of which registers its family.

    Discovery (rather than a fixed list) lets a new family be one new file.
    """
    import svdkernels.bench as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name != "runner":
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    return FAMILIES


# ---------------------------------------------------------------------------
# Device and timing

_device: torch.device | None = None


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


# ---------------------------------------------------------------------------
# Peak numbers and the roofline


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


# ---------------------------------------------------------------------------
# Output: tables, JSON, plot


def _fmt_time(ms: float | None) -> str:
    if ms is None or not math.isfinite(ms):
        return "-"
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.3g}"


def _fmt_num(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    # Fixed decimals near 1 so that error ratios like 1.0004 stay readable.
    return f"{v:.4f}" if 0.1 <= abs(v) < 100 else f"{v:.2e}"


def format_table(title: str, rows: Sequence[Row], legend: str = "") -> str:
    """An aligned text table: workload, method, time, ratio to ours, errors, note."""
    err_keys = list(dict.fromkeys(k for row in rows for k in row.errors))
    header = ["workload", "method", "time ms", "vs ours", *err_keys, "note"]
    body: list[list[str]] = []
    prev = None
    for row in rows:
        body.append(
            [
                row.workload if row.workload != prev else "",
                row.method,
                _fmt_time(row.time_ms),
                "-" if row.vs_ours is None else f"{row.vs_ours:.2f}",
                *(_fmt_num(row.errors.get(k)) for k in err_keys),
                row.note,
            ]
        )
        prev = row.workload
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    numeric = range(2, len(header) - 1)

    def line(cells: list[str]) -> str:
        parts = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    rule = "-" * len(line(header))
    out = [f"== {title} ==", line(header), rule]
    for i, cells in enumerate(body):
        if i and cells[0]:  # a blank line between workloads
            out.append("")
        out.append(line(cells))
    out.append(rule)
    out.append("vs ours = time / our time (> 1: ours is faster).")
    if legend:
        out.append(legend)
    return "\n".join(out)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers depend on: versions, threads, CPU and device."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = os.getloadavg()[0]
    return info


def _finite_or_none(obj: Any) -> Any:
    # Strict JSON has no NaN/inf: a metric that could not be computed becomes null.
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def write_json(path: Path, results: Mapping[str, Sequence[Row]], **meta: Any) -> None:
    """Write ``{**meta, "families": {name: [row, ...]}}`` as strict JSON."""
    doc = dict(meta)
    doc["families"] = {name: [dataclasses.asdict(r) for r in rows] for name, rows in results.items()}
    path.write_text(json.dumps(_finite_or_none(doc), indent=2, allow_nan=False) + "\n")


def write_plot(path: Path, results: Mapping[str, Sequence[Row]]) -> bool:
    """Bar chart of the timed rows, one panel per family; False if matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [(name, [r for r in rows if r.time_ms]) for name, rows in results.items()]
    panels = [(name, rows) for name, rows in panels if rows]
    if not panels:
        return False
    heights = [max(2.0, 0.28 * len(rows) + 1.0) for _, rows in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    colors = {"ours": "tab:red", "peer": "tab:blue", "bare": "tab:gray", "roofline": "black"}
    for ax, (name, rows) in zip(axes[:, 0], panels):
        labels = [f"{r.workload} | {r.method}" for r in rows]
        ax.barh(range(len(rows)), [r.time_ms for r in rows],
                color=[colors.get(r.kind, "tab:blue") for r in rows])
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("time (ms, log scale)")
        ax.set_title(name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------
# The driver


def run(
    only: Sequence[str] | None = None,
    *,
    quick: bool = False,
    repeats: int | None = None,
    out_dir: Path = Path("bench-results"),
    device: torch.device | None = None,
) -> dict[str, list[Row]]:
    """Run the selected families (all if ``only`` is empty), print their tables and
    write ``out_dir/bench.json`` (and ``bench.png`` where matplotlib is installed).

    ``repeats`` defaults to 3 with ``quick`` and 5 otherwise.
    """
    from tqdm import tqdm

    global _device
    families = load_families()
    names = list(only) if only else sorted(families)
    unknown = [n for n in names if n not in families]
    if unknown:
        raise ValueError(f"only: unknown family {unknown}; expected some of {sorted(families)}")
    if repeats is None:
        repeats = 3 if quick else 5
    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, got {repeats}")
    _device = device or bench_device()

    machine = machine_info(_device)
    peaks = device_peaks(_device, quick)
    flops = ", ".join(f"{d} {f / 1e9:.0f} GFLOP/s" for d, f in peaks.flops.items())
    print(
        f"{machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}, device {_device}; "
        f"peaks ({peaks.source}): {flops}, {peaks.bandwidth / 1e9:.1f} GB/s",
        flush=True,
    )
    load = machine.get("load_average_1min", 0.0)
    if _device.type == "cpu" and load >= 1.0:
        # Other processes on the same cores inflate CPU timings (GEMM threads wait on each other).
        print(f"warning: load average {load:.1f} on {machine['cpu_count']} CPUs before the run: "
              "timings may be inflated", file=sys.stderr, flush=True)

    counts = [families[n].count(quick) for n in names if families[n].count]
    total = sum(counts) if len(counts) == len(names) else None
    results: dict[str, list[Row]] = {}
    with tqdm(total=total, file=sys.stderr, unit="workload", dynamic_ncols=True) as bar:
        for name in names:
            family = families[name]
            bar.set_description(name)
            rows: list[Row] = []
            current = None
            for item in family.fn(quick, repeats):
                workload = item if isinstance(item, str) else item.workload
                if workload != current:  # a new workload starts: the previous one is done
                    if current is not None:
                        bar.update(1)
                    current = workload
                    bar.set_postfix_str(workload)
                if isinstance(item, Row):
                    item.family = name
                    rows.append(item)
            if current is not None:
                bar.update(1)
            fill_vs_ours(rows)
            results[name] = rows
            # tqdm.write keeps the bar (stderr) from tearing through the table.
            tqdm.write(format_table(name, rows, family.legend) + "\n", file=sys.stdout)
            sys.stdout.flush()

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        out_dir / "bench.json",
        results,
        machine=machine,
        peaks=dataclasses.asdict(peaks),
        settings={"quick": quick, "repeats": repeats, "families": names},
    )
    # The plot is optional: a plotting failure must not fail a finished run.
    try:
        plotted = write_plot(out_dir / "bench.png", results)
    except Exception as e:  # noqa: BLE001
        print(f"bench: could not write bench.png: {e}", file=sys.stderr)
        plotted = False
    print(f"wrote {out_dir / 'bench.json'}" + (f" and {out_dir / 'bench.png'}" if plotted else ""))
    return results
