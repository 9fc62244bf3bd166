"""Output of a run: aligned text tables, the machine description, strict JSON and the PNG."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from svdkernels.bench.rows import Row


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
