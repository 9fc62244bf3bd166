"""The driver of ``python -m svdkernels bench``: :func:`run` loads the families, runs
them with a progress bar, prints one table per family and writes ``bench.json`` and
``bench.png``. The machinery lives beside it: rows.py, registry.py, timing.py,
peaks.py, report.py."""
from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from svdkernels.bench.registry import load_families
from svdkernels.bench.report import format_table, machine_info, write_json, write_plot
from svdkernels.bench.peaks import device_peaks
from svdkernels.bench.rows import Row, fill_vs_ours
from svdkernels.bench.timing import bench_device, set_bench_device


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

    families = load_families()
    names = list(only) if only else sorted(families)
    unknown = [n for n in names if n not in families]
    if unknown:
        raise ValueError(f"only: unknown family {unknown}; expected some of {sorted(families)}")
    if repeats is None:
        repeats = 3 if quick else 5
    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, got {repeats}")
    device = device or bench_device()
    set_bench_device(device)

    machine = machine_info(device)
    peaks = device_peaks(device, quick)
    flops = ", ".join(f"{d} {f / 1e9:.0f} GFLOP/s" for d, f in peaks.flops.items())
    print(
        f"{machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}, device {device}; "
        f"peaks ({peaks.source}): {flops}, {peaks.bandwidth / 1e9:.1f} GB/s",
        flush=True,
    )
    load = machine.get("load_average_1min", 0.0)
    if device.type == "cpu" and load >= 1.0:
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
        settings={"quick": quick, "repeats": repeats, "families": names, "out": str(out_dir)},
    )
    # Plots are optional: a plotting failure must not fail a finished run.
    pictures = [("bench.png", lambda path: write_plot(path, results))]
    pictures += [(f"{name}.png", functools.partial(families[name].plot, results[name]))
                 for name in names if families[name].plot is not None]
    written = []
    for filename, draw in pictures:
        try:
            if draw(out_dir / filename):
                written.append(str(out_dir / filename))
        except Exception as e:  # noqa: BLE001
            print(f"bench: could not write {filename}: {e}", file=sys.stderr)
    print(f"wrote {out_dir / 'bench.json'}" + (f" and {', '.join(written)}" if written else ""))
    return results
